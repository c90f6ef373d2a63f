"""Shared command-line plumbing for the launchers: arguments and one-line errors."""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
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


def deepspeed_launcher_pid() -> Optional[int]:
    """The pid of the ``deepspeed.launcher.launch`` process that started this rank (``deepspeed script.py``), or
    None (a plain ``python`` run, torchrun, a batch system's launcher, or no /proc to tell)."""
    if os.environ.get("LOCAL_RANK") is None:
        return None
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    return parent if b"deepspeed.launcher.launch" in argv else None


# The helper behind report_after_exit, run as `python -I -S -c` (no site, no codir_ds: it starts in ~10 ms): says it
# is ready, waits until the process behind the inherited pidfd has exited (at most 10 minutes), writes the line to
# its stderr (the rank's). A SIGTERM (from a launcher cleaning up the rank's process tree) writes it at once.
_REPORT_AFTER_EXIT = """
import os, select, signal, sys
pidfd, ready, line = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode() + b"\\n"
def report(*_):
    os.write(2, line)
    os._exit(0)
signal.signal(signal.SIGTERM, report)
os.write(ready, b"1")
os.close(ready)
poller = select.poll()
poller.register(pidfd, select.POLLIN)
poller.poll(600_000)
report()
"""


def report_after_exit(pid: int, line: str) -> bool:
    """Have ``line`` written to this process's stderr just after process ``pid`` exits, by a detached helper.

    Returns False, having arranged nothing, where that is not possible (no ``os.pidfd_open``: not Linux >= 5.3;
    ``pid`` gone; the helper did not start within 10 s); the caller then prints ``line`` itself.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return False
    import select
    import subprocess
    ready_r, ready_w = os.pipe()
    helper = None
    try:
        helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _REPORT_AFTER_EXIT, str(pidfd), str(ready_w),
                                   line], pass_fds=(pidfd, ready_w), stdin=subprocess.DEVNULL,
                                  start_new_session=True)  # not in the terminal's process group: no Ctrl-C
        os.close(ready_w)
        ready_w = -1
        if select.select([ready_r], [], [], 10)[0] and os.read(ready_r, 1) == b"1":
            return True
        helper.kill()  # never ready: it must not print as well
        return False
    except OSError:
        if helper is not None:
            helper.kill()
        return False
    finally:
        for fd in (pidfd, ready_r, ready_w):
            if fd >= 0:
                os.close(fd)


def report_line(line: str) -> None:
    """Rank 0's closing line on stderr: under the ``deepspeed`` launcher written once launch.py has exited (so that
    its own lines do not bury it), else at once."""
    launcher = deepspeed_launcher_pid()
    if launcher is None or not report_after_exit(launcher, line):
        print(line, file=sys.stderr, flush=True)


def exit_status(results: dict) -> int:
    """A launcher's exit status for a recipe's results: PREEMPTED_EXIT when a signal stopped it after saving."""
    from codir_ds.engine.preemption import PREEMPTED_EXIT
    return PREEMPTED_EXIT if "preempted_at_step" in (results or {}) else 0


def run_main(main: Callable[[], int]) -> None:
    """Run a launcher's main; bad input ends with ``error: <one line>`` and exit status 2.

    Under the ``deepspeed`` launcher (deepspeed/launcher/launch.py, DeepSpeed 0.19.8) the rank's exit status 2 is
    the job's (launch.py exits with it, and runner.py with launch.py's), but launch.py reports a failed rank after
    it has exited: ``[ERROR] [launch.py:...] [<command>] exits with return code = 2``, unconditionally at every
    --log_level below critical, and nothing in the rank, its environment or its exit status can suppress that. So
    there rank 0 hands its line to a helper that writes it once launch.py has exited: the error stays the last
    line the user reads, and the exit status stays 2. Ranks other than 0 print nothing; under that launcher they
    also wait 2 s before exiting, so that rank 0's report is not cut short by launch.py terminating it because
    another rank failed first.
    """
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before training started (while training, the recipe saves and stops)
        if os.environ.get("RANK", "0") == "0":
            report_line("interrupted (Ctrl-C) before training started: no checkpoint was saved")
        sys.exit(130)
    except CodirError as e:
        rank = os.environ.get("RANK", "0")
        launcher = deepspeed_launcher_pid()
        if rank == "0":
            report_line(f"error: {e}")
        elif launcher is not None:
            time.sleep(2)
        sys.exit(2)
