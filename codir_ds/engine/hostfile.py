"""DeepSpeed hostfiles: parse and check one before a multi-node job starts.

A hostfile lists one node per line, MPI style::

    # comment lines and blank lines are ignored
    worker-0 slots=8
    worker-1 slots=8

``deepspeed --hostfile`` (``deepspeed.launcher.runner._parse_hostfile``, 0.19.8) reads
each stripped line with ``re.search(r'^(\\S+)\\s+slots=(\\d+)', line)``: a line starting
with ``#`` or empty is skipped, a matching line gives ``host -> slots``, anything else,
a repeated host or a file without hosts raises ``ValueError``. A *missing* hostfile is
not an error there: the runner warns and silently trains on the local machine only.

:func:`parse_hostfile` accepts the same lines with the same result, and refuses,
with a one-line :class:`~codir_ds.errors.CodirError` naming file, line and fix, what
DeepSpeed refuses plus what it would accept but misread:

- a missing or unreadable file (DeepSpeed would fall back to one node);
- ``slots=0`` (a host that gets no rank) and digits glued to text (``slots=8gpus``
  reads as 8);
- text after ``slots=<n>`` other than ``key=value`` fields (``max_slots=8``, which
  OpenMPI hostfiles carry) or a ``# comment``;
- host names containing ``,`` ``@`` ``:`` or ``=``: pdsh's ``-w a,b`` host list and
  DeepSpeed's ``--include host@host:0,1`` syntax split on them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Union

from codir_ds.errors import CodirError

# DeepSpeed's own pattern; a line it does not match is refused by DeepSpeed too.
DEEPSPEED_PATTERN = re.compile(r"^(\S+)\s+slots=(\d+)")
_SLOTS_VALUE = re.compile(r"^(\S+)\s+slots=(\S*)")
_BAD_HOST_CHARS = set(",@:=")
_FORMAT = "'<hostname> slots=<n>' with n >= 1"
_SLOTS = "a positive whole number (1, 2, ...)"


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_tail(tail: str) -> bool:
    """What may follow ``slots=<n>``: whitespace-separated ``key=value`` fields, then a ``# comment``."""
    if tail == "":
        return True
    if not tail[0].isspace():
        return False
    for field in tail.split():
        if field.startswith("#"):
            return True
        key, eq, value = field.partition("=")
        if not (key and eq and value):
            return False
    return True


def parse_hostfile_lines(lines: list[str], name: str) -> dict[str, int]:
    """``hostname -> slots`` in file order from the lines of a hostfile called ``name`` (for messages)."""
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if line == "" or line.startswith("#"):
            continue
        where = f"hostfile '{name}' line {number}: '{_shorten(line)}'"
        match = DEEPSPEED_PATTERN.match(line)
        if match is None:
            loose = _SLOTS_VALUE.match(line)
            if loose is not None:
                raise CodirError(f"{where} has slots='{_shorten(loose.group(2), 20)}': slots must be {_SLOTS}: "
                                 f"write {_FORMAT}, e.g. '{loose.group(1)} slots=8', or remove the line")
            raise CodirError(f"{where} is not {_FORMAT} (one host per line, '#' starts a comment): fix or remove "
                             f"the line")
        host, slots = match.group(1), int(match.group(2))
        tail = line[match.end():]
        if tail and not tail[0].isspace():
            glued = _shorten(match.group(2) + tail.split()[0], 20)
            raise CodirError(f"{where}: slots must be {_SLOTS}, not '{glued}' (DeepSpeed would read {slots}): "
                             f"write {_FORMAT} or remove the line")
        if not _check_tail(tail):
            raise CodirError(f"{where} has unexpected text after slots={match.group(2)}: write {_FORMAT}, optionally "
                             f"followed by key=value fields or a '# comment', or remove the line")
        bad = sorted(_BAD_HOST_CHARS & set(host))
        if bad:
            raise CodirError(f"{where}: host name '{_shorten(host, 30)}' contains '{''.join(bad)}', which pdsh and "
                             f"deepspeed --include split on: use the plain host name or IP address")
        if slots < 1:
            raise CodirError(f"{where}: slots must be {_SLOTS}, not {slots} (the number of GPUs, or CPU ranks, "
                             f"to use on '{host}'): set it or remove the line")
        if host in hosts:
            raise CodirError(f"{where}: host '{host}' is already listed on line {first_line[host]}: list each host "
                             f"once, with all its slots")
        hosts[host] = slots
        first_line[host] = number
    if not hosts:
        raise CodirError(f"hostfile '{name}' lists no hosts (only comments or blank lines): add one line "
                         f"'<hostname> slots=<n>' per node")
    return hosts


def parse_hostfile(path: Union[str, Path]) -> dict[str, int]:
    """Read a DeepSpeed hostfile; returns ``hostname -> slots`` in file order (the node order).

    Raises :class:`CodirError` (one line: file, line number, offending text, fix) on bad input.
    """
    path = Path(path)
    if not path.exists():
        raise CodirError(f"hostfile '{path}' does not exist: write one line '<hostname> slots=<n>' per node "
                         f"(see launchers/hostfile.example); deepspeed would silently run on this machine only")
    if not path.is_file():
        raise CodirError(f"hostfile '{path}' is not a file: pass the path of a hostfile")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise CodirError(f"hostfile '{path}' is not text ({e.reason} at byte {e.start}): pass a plain-text "
                         f"hostfile") from None
    except OSError as e:
        raise CodirError(f"hostfile '{path}' cannot be read ({e.strerror}): check its permissions") from None
    return parse_hostfile_lines(text.splitlines(), str(path))


def summary(hosts: dict[str, int]) -> str:
    """One line: ``N hosts, M slots``."""
    n, m = len(hosts), sum(hosts.values())
    return f"{n} host{'s' if n != 1 else ''}, {m} slot{'s' if m != 1 else ''}"
