"""What the bench scripts' command lines share: one-line argument errors, JSON reading, shown commands.

Every script starts with ``sys.path.insert(0, <repo>)`` (it runs as ``python bench/<script>.py``), then imports
``bench.cli`` and its sibling scripts as ``bench.<name>``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional


class ArgumentError(Exception):
    """A bad command line: reported as one ``error: ...`` line, exit status 2, before anything runs."""


def fail(error: Exception) -> NoReturn:
    """Report ``error`` as one ``error:`` line on stderr and exit with status 2."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """``argparse`` whose own errors are one line naming the script's ``--help`` (no usage block)."""

    def __init__(self, *args, script: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.script = script  # e.g. "bench/compare.py", named in the one-line errors

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(f"{message} (see python {self.script} --help)")

    def parse_checked(self, argv: Optional[list[str]], check: Callable[[argparse.Namespace], None]):
        """``parse_args``, then ``check(args)``: an :class:`ArgumentError` is one ``error:`` line, exit 2."""
        try:
            args = self.parse_args(argv)
            check(args)
        except ArgumentError as e:
            fail(e)
        return args


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def emit_report(report: dict, output: Optional[str]) -> None:
    """Print ``report`` as indented JSON and, with ``output``, write the same text to that file."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")


def shown_command(cmd: list[str], env: str = "") -> str:
    """A launch as a user types it (``deepspeed ...`` / ``python ...``), after ``env`` (e.g. ``OMP_NUM_THREADS=2``)."""
    if cmd[1:3] == ["-m", "deepspeed.launcher.runner"]:
        shown = shlex.join(["deepspeed", *cmd[3:]])
    else:
        shown = shlex.join(["python", *cmd[1:]])
    return f"{env} {shown}" if env else shown


def int_list(text: str) -> list[int]:
    """``"64,128"`` -> ``[64, 128]`` (an argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} holds no value")
    return values
