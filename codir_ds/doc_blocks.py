"""Generated blocks inside hand-written docs: a block between two marker lines is rewritten from the code.

Used by ``codir_ds.tag_reference`` (docs/running.md's TensorBoard tags) and ``codir_ds.method_index``
(docs/methods/README.md's method table); the tests check each block is fresh.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def current(path: Path, begin: str, end: str) -> str:
    """The block of ``path`` from ``begin`` to ``end``, both markers included."""
    text = path.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no generated block ({begin} ... {end}): add the two markers")
    return begin + text.split(begin, 1)[1].split(end, 1)[0] + end


def write(path: Path, begin: str, end: str, rendered: str) -> bool:
    """Replace the block of ``path`` with ``rendered`` (which starts with ``begin`` and ends with ``end``);
    True when the file changed."""
    old = current(path, begin, end)
    text = path.read_text(encoding="utf-8")
    new = text.replace(old, rendered, 1)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv, description: str, path: Path, begin: str, end: str, render: Callable[[], str]) -> int:
    """``--write``: rewrite the block of ``path``; without it, print the rendered block."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--write", action="store_true", help=f"rewrite the generated block of {path.name}")
    if ap.parse_args(argv).write:
        print(f"{'wrote' if write(path, begin, end, render()) else 'unchanged'}: {path}")
    else:
        print(render())
    return 0
