"""Shared command-line plumbing for the launchers: arguments and one-line errors."""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from typing import Callable, Optional

from codir_ds.errors import CodirError


# A help text that states its option's default: "(default 1,2,3)", "...; default: X", "default runs/...".
_SAYS_DEFAULT = re.compile(r"(^|[(;:,]\s*)default\b")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default as ``(default: X)``, options without a help text included, except
    where the help already says it or there is none to show (``None``, an off flag, an empty list)."""

    @staticmethod
    def shows_default(action: argparse.Action) -> bool:
        value = action.default
        if value is None or value is False or value is argparse.SUPPRESS or (isinstance(value, list) and not value):
            return False
        return bool(action.option_strings) and not _SAYS_DEFAULT.search(action.help or "")

    def _format_action(self, action: argparse.Action) -> str:
        if self.shows_default(action):
            value = action.default  # a list as typed on the command line (nargs="+"): "ce kd codir"
            shown = " ".join(map(str, value)).replace("%", "%%") if isinstance(value, list) else "%(default)s"
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: {shown})".strip()
        return super()._format_action(action)


def methods_epilog(stage: str) -> str:
    """The ``method.name`` values ``stage`` (finetune / pretrain) accepts, one per line with its summary.

    Read from the method registry, so a launcher's --help lists every registered method (imports torch).
    """
    from codir_ds.distill.methods import get_method, method_names
    names = method_names(stage)
    width = max(len(n) for n in names)
    rows = [f"  {n:<{width}}  {get_method(n).summary}" for n in names]
    return "methods (--set method.name=NAME; see docs/methods/):\n" + "\n".join(rows)


def base_parser(description: str, default_config: Optional[str] = None,
                default_output: bool = False, stage: Optional[str] = None) -> argparse.ArgumentParser:
    """Arguments every training launcher takes (a stable contract: docs/running.md).

    ``default_config``: the YAML used when --config is not given. ``default_output``: when
    --output_dir is not given the launcher uses ``runs/<config name>``. ``stage``: list that
    stage's methods (from the registry) below the options.
    """
    ap = argparse.ArgumentParser(description=description, epilog=methods_epilog(stage) if stage else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
    import warnings
    # DeepSpeed 0.19.8's ZeRO optimizers gather partitions with torch.distributed.all_gather_into_tensor
    # (runtime/utils.py all_gather_into_tensor_dp_groups in the ZeRO-1/2 step; ZeRO-3 gathers too), which torch 2.13
    # deprecates for all_gather_single: one FutureWarning per rank at the first step of every multi-rank run,
    # attributed to torch/distributed/c10d_logger.py. The call is DeepSpeed's (ours use all_gather_single, see
    # codir_ds/distill/memory_bank.py) and the user can do nothing about it: filter exactly that message.
    warnings.filterwarnings("ignore", message=re.escape("`torch.distributed.all_gather_into_tensor` is deprecated"),
                            category=FutureWarning, module=r"torch\.distributed\.c10d_logger$")


def run_main(main: Callable[[], int]) -> None:
    """Run a launcher's main; bad input ends with ``error: <one line>`` and exit status 2."""
    try:
        sys.exit(main())
    except CodirError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
