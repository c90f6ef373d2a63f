"""Shared command-line plumbing for the launchers: arguments and one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from codir_ds.errors import CodirError


def base_parser(description: str, default_config: Optional[str] = None,
                default_output: bool = False) -> argparse.ArgumentParser:
    """Arguments every training launcher takes (a stable contract: docs/running.md).

    ``default_config``: the YAML used when --config is not given. ``default_output``: when
    --output_dir is not given the launcher uses ``runs/<config name>``.
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default=default_config,
                    help="experiment YAML (see configs/)" + (f"; default {default_config}" if default_config else ""))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set training.lr=1e-4 (repeatable)")
    ap.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (see ds_configs/)")
    ap.add_argument("--output_dir", required=not default_output,
                    help="run directory (config, checkpoints, tensorboard, results)"
                         + ("; default runs/<config name>" if default_output else ""))
    ap.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="replace the run in --output_dir")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return ap


def quiet_environment() -> None:
    """Keep third-party start-up chatter out of the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    import logging
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def run_main(main: Callable[[], int]) -> None:
    """Run a launcher's main; bad input ends with ``error: <one line>`` and exit status 2."""
    try:
        sys.exit(main())
    except CodirError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
