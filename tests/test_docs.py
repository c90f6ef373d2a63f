"""The documentation: the generated config reference is current, links resolve, the README stays short.

No torch, no DeepSpeed: these checks read files and the config dataclasses only.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from codir_ds import config_reference

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 200
# Text no page may contain: files users do not have, and notes about how the docs came to be.
FORBIDDEN = ("METHODS.md", "DEEPSPEED_CPU.md", "../shared", "/work/shared", "this session")

# [text](target) and ![alt](target), with an optional "title"; the target has no spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def doc_files() -> list[Path]:
    return [README] + sorted(DOCS.rglob("*.md"))


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks (links in code are not links)."""
    out, in_code = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            out.append((number, re.sub(r"`[^`]*`", "", line)))  # nor are links inside inline code
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every link to a file in the repository (no URL, no bare anchor)."""
    links = []
    for number, line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s)://, mailto:, ... and anchors within the page
            links.append((number, target))
    return links


def test_configuration_reference_is_current():
    page = DOCS / "configuration.md"
    assert page.is_file(), f"docs/configuration.md is missing: generate it with `{config_reference.COMMAND}`"
    assert page.read_text(encoding="utf-8") == config_reference.render(), (
        f"docs/configuration.md is stale (the config dataclasses' fields or help texts changed): "
        f"regenerate it with `{config_reference.COMMAND}`")


def test_configuration_reference_covers_every_key():
    import dataclasses
    import typing

    from codir_ds.config import ExperimentConfig

    text = config_reference.render()
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            assert f"## `{f.name}`" in text
            for sub in dataclasses.fields(hints[f.name]):
                assert f"| `{f.name}.{sub.name}` |" in text, f"{f.name}.{sub.name} is not in the reference"
        else:
            assert f"| `{f.name}` |" in text


def test_render_handles_any_dataclass_section(monkeypatch):
    """A section built at run time, with "methods" metadata, gets a "used by" column."""
    import dataclasses
    from typing import Optional

    section = dataclasses.make_dataclass("Extra", [
        ("alpha", float, dataclasses.field(default=0.5, metadata={"help": "a | b <c>", "methods": ("kd", "codir")})),
        ("layers", Optional[list[int]], dataclasses.field(default=None)),
        ("names", list[str], dataclasses.field(default_factory=lambda: ["x", "y"], metadata={"help": "names"})),
    ])
    experiment = dataclasses.make_dataclass("Exp", [
        ("name", str, dataclasses.field(default="e", metadata={"help": "the name"})),
        ("extra", section, dataclasses.field(default_factory=section)),
    ])
    monkeypatch.setattr(config_reference, "ExperimentConfig", experiment)
    text = config_reference.render()
    assert "## Top level" in text and "| `name` | `str` | `e` | the name |" in text
    assert "## `extra`" in text
    assert "| key | type | default | used by | help |" in text
    assert r"| `extra.alpha` | `float` | `0.5` | `kd`, `codir` | a \| b &lt;c> |" in text
    assert r"| `extra.layers` | `list[int] \| null` | `null` |  |  |" in text
    assert "| `extra.names` | `list[str]` | `[x, y]` |  | names |" in text


@pytest.mark.parametrize("path", doc_files(), ids=_ids(doc_files()))
def test_relative_links_resolve(path):
    missing = []
    for number, target in relative_links(path):
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            missing.append(f"{path.relative_to(REPO)}:{number}: {target}")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the detail into docs/")


@pytest.mark.parametrize("path", doc_files(), ids=_ids(doc_files()))
def test_no_reference_to_missing_files_or_sessions(path):
    text = path.read_text(encoding="utf-8")
    found = [word for word in FORBIDDEN if word.lower() in text.lower()]
    assert not found, f"{path.relative_to(REPO)} mentions {found}: users do not have these files; write what " \
                      f"they need into the docs instead"
