"""Help texts and the docs that quote the code: what they list is what the code has.

- the training launchers' --help lists every registered method of their stage (from the registry);
- every bench script's --help shows its options' defaults, and the throughput scripts say they
  time finetuning as well as pre-training;
- the demo launchers describe themselves as the README does (which one is the main job);
- every benchmark command the bench docs show for a committed result is the command recorded with
  it, and the bench README does not deny the GPU results that are committed;
- every TensorBoard tag the code writes is in docs/running.md (the end-to-end tests check the tags
  their runs write with :func:`undocumented_tags`).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LAUNCHERS = REPO / "launchers"
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
BENCH_DOCS = [BENCH / "README.md", REPO / "docs" / "benchmarks.md"]
RUNNING = REPO / "docs" / "running.md"
COMMAND = "python -m codir_ds.tag_reference --write"


def _help(script: Path) -> str:
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=180,
                          cwd=str(REPO))
    assert proc.returncode == 0, f"{script.name} --help: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    return proc.stdout or proc.stderr  # bench/throughput.py keeps stdout for its JSON: its help goes to stderr


def _first_doc_line(script: Path) -> str:
    return ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))).splitlines()[0]


# ------------------------------------------------------------------ 1. the training launchers' methods

def _listed_methods(help_text: str) -> list[str]:
    """The method names of a launcher's ``methods (...)`` epilog, in order."""
    assert "methods (--set method.name=NAME" in help_text, help_text
    section = help_text.split("methods (--set method.name=NAME", 1)[1].splitlines()[1:]
    return [m.group(1) for m in (re.match(r"^  ([a-z0-9_]+)  ", line) for line in section) if m]


@pytest.mark.parametrize("script,stage", [("finetune.py", "finetune"), ("pretrain.py", "pretrain")])
def test_training_launcher_help_lists_every_method_of_its_stage(script, stage):
    from codir_ds.distill.methods import method_names
    assert _listed_methods(_help(LAUNCHERS / script)) == list(method_names(stage))


def test_methods_epilog_follows_the_registry(monkeypatch):
    """A newly registered method appears in --help without touching the launchers."""
    from codir_ds.cli import methods_epilog
    from codir_ds.distill.methods import registry

    class Extra:
        name, stages, summary = "extra_method", ("finetune",), "a method registered after the launchers were written"

    monkeypatch.setitem(registry._METHODS, Extra.name, Extra)
    assert _listed_methods(methods_epilog("finetune"))[-1] == "extra_method"
    assert "a method registered after" in methods_epilog("finetune")
    assert "extra_method" not in methods_epilog("pretrain")


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"help_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,stage", [("demo_finetune.py", "finetune"), ("demo_pretrain.py", "pretrain")])
def test_demo_method_choices_are_registered_methods_of_their_stage(script, stage):
    from codir_ds.distill.methods import method_names
    text = _help(LAUNCHERS / script)
    choices = re.search(r"--methods \{([a-z0-9_,]+)\}", text).group(1).split(",")
    variants = getattr(_module(LAUNCHERS / script), "PRE_VARIANTS", {})  # a variant: a method plus overrides
    methods = {variants[c][0] if c in variants else c for c in choices}
    assert methods <= set(method_names(stage)), choices
    assert "(default: " in text  # the demos show their defaults too


@pytest.mark.parametrize("script", ["evaluate.py", "export.py", "fit_teacher_head.py", "check_hostfile.py"])
def test_other_launchers_help_runs(script):
    assert "usage:" in _help(LAUNCHERS / script)


# ------------------------------------------------------------------ 2. the bench scripts' defaults

# Options with a value but no default to show (None: "not given"; --set: repeatable, none by default).
NO_DEFAULT = {
    "throughput.py": {"--peak_tflops", "--output"},
    "weak_scaling.py": set(),
    "teacher_cache.py": {"--work_dir", "--output", "--set"},
    "compare.py": {"--task", "--set"},
    "student_options.py": {"--output", "--set"},
    "deploy_cost.py": {"--out"},
}


def _option_blocks(help_text: str) -> dict[str, str]:
    """``--option -> its help text`` for the options that take a value (flags left out)."""
    blocks, name = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (?:-\w, )?(--[a-z_]+)(.*)$", line)
        if m:
            takes_value = re.match(r"^ ([A-Z_]+|\{[^}]*\})", m.group(2))
            name = m.group(1) if takes_value else None
            if name:
                blocks[name] = m.group(2)
        elif name and line.startswith("      "):
            blocks[name] += " " + line.strip()
        elif not line.startswith("  "):
            name = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.mark.parametrize("script", sorted(NO_DEFAULT))
def test_bench_help_shows_defaults(script):
    text = _help(BENCH / script)
    blocks = _option_blocks(text)
    assert blocks, text
    missing = [k for k, v in blocks.items() if "default" not in v and k not in NO_DEFAULT[script]]
    assert not missing, f"bench/{script} --help shows no default for {missing}"


@pytest.mark.parametrize("script", ["throughput.py", "weak_scaling.py"])
def test_throughput_benchmarks_say_they_time_finetuning_too(script):
    description = _help(BENCH / script).split("options:", 1)[0]
    assert "pre-training" in description and "finetuning" in description, description


def test_defaults_formatter():
    import argparse

    from codir_ds.cli import DefaultsHelpFormatter
    ap = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    ap.add_argument("--size", default="cpu", help="preset (default cpu)")
    ap.add_argument("--methods", nargs="+", default=["ce", "kd"])
    ap.add_argument("--output", default=None, help="a file")
    ap.add_argument("--force", action="store_true", help="rerun")
    ap.add_argument("--set", action="append", default=[], help="override")
    blocks = _option_blocks(ap.format_help())
    assert blocks["--steps"] == "STEPS (default: 0)"
    assert blocks["--lr"] == "LR learning rate (default: 0.001)"
    assert blocks["--size"] == "SIZE preset (default cpu)"
    assert blocks["--methods"].endswith("(default: ce kd)")
    assert "default" not in blocks["--output"] + blocks["--set"]
    assert "default" not in ap.format_help().split("options:", 1)[1].split("--force", 1)[1].split("--set", 1)[0]


# ------------------------------------------------------------------ 3. which demo is the main job

def test_demos_describe_themselves_as_the_readme_does():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(r"bash scripts/demo\.sh\s+# the main job", readme)
    main = re.search(r"python (launchers/demo_\w+\.py)", (REPO / "scripts" / "demo.sh").read_text()).group(1)
    assert f"| `{main}` | the main job" in readme
    for demo in sorted(LAUNCHERS.glob("demo_*.py")):
        line = _first_doc_line(demo)
        if f"launchers/{demo.name}" == main:
            assert "main job" in line and "scripts/demo.sh" in line, line
        else:
            assert "main job" not in line, f"{demo.name} calls itself the main job; the README's is {main}: {line}"


# ------------------------------------------------------------------ 4. benchmark commands and results

def shell_commands(path: Path) -> list[str]:
    """Every command in a page's fenced code blocks: continuation lines joined, whitespace normalised."""
    commands, in_code, pending = [], False, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        line = (pending + " " + line.strip().removeprefix("$ ")).strip()
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        if line and not line.startswith("#"):
            commands.append(" ".join(line.split()))
    return commands


def _normal(command: str) -> str:
    return re.sub(r"^python3? ", "", " ".join(command.split()))


def _option(args: list[str], name: str):
    return args[args.index(name) + 1] if name in args else None


def recorded_commands() -> dict[str, set[str]]:
    """``script -> the commands recorded with committed results`` (first line of a table, a JSON's command)."""
    out: dict[str, set[str]] = {}
    for md in RESULTS.rglob("*.md"):
        first = md.read_text(encoding="utf-8").splitlines()[0]
        out.setdefault(shlex.split(first)[1], set()).add(_normal(first))
    for path in RESULTS.rglob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        command = data.get("command") or data.get("config", {}).get("command") if isinstance(data, dict) else None
        if command:
            out.setdefault(next(a for a in shlex.split(command) if a.endswith(".py")), set()).add(_normal(command))
    return out


def _names_committed_result(args: list[str]) -> bool:
    """Whether a bench command writes into a committed results location."""
    for flag in ("--out", "--output_dir", "--output"):
        target = _option(args, flag)
        if target and target.startswith("bench/results/") and (REPO / target).exists():
            return True
    return False


@pytest.mark.parametrize("page", BENCH_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_bench_doc_commands_are_the_recorded_ones(page):
    """A compare / weak-scaling command on the page is the first line of a committed table; any bench
    command that writes a committed result is the command recorded in it."""
    recorded = recorded_commands()
    assert recorded.get("bench/compare.py") and recorded.get("bench/weak_scaling.py")
    stale = []
    for command in shell_commands(page):
        if not re.match(r"python3? bench/\w+\.py( |$)", command):
            continue
        args = shlex.split(command)
        script = args[1]
        if script in ("bench/compare.py", "bench/weak_scaling.py") or _names_committed_result(args):
            if _normal(command) not in recorded.get(script, set()):
                stale.append(command)
    assert not stale, (f"{page.relative_to(REPO)} shows commands that produced none of the committed results "
                       f"(copy the first line of the results file):\n" + "\n".join(stale))


def test_bench_readme_knows_the_committed_gpu_results():
    text = (BENCH / "README.md").read_text(encoding="utf-8")
    gpu_dirs = [d.name for d in RESULTS.iterdir() if d.is_dir() and re.search(r"h100|h200|a100|gpu", d.name)]
    assert gpu_dirs, "expected committed GPU results under bench/results/"
    assert not re.search(r"no gpu results", text, re.IGNORECASE)
    for name in gpu_dirs:
        assert f"bench/results/{name}" in text, f"bench/README.md never mentions bench/results/{name}"


# ------------------------------------------------------------------ 5. TensorBoard tags

def documented_tags() -> set[str]:
    """The tags in docs/running.md's "TensorBoard tags" section."""
    text = RUNNING.read_text(encoding="utf-8")
    section = text.split("\n## TensorBoard tags\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`([a-z_]+/[a-z0-9_<>]+)`", section))


def undocumented_tags(tags) -> list[str]:
    """The ``tags`` (as written to TensorBoard) that docs/running.md does not list."""
    documented = documented_tags()
    missing = []
    for tag in sorted(tags):
        if tag in documented:
            continue
        if tag.startswith("eval/large_") and "eval/large_<name>" in documented \
                and "eval/" + tag[len("eval/large_"):] in documented:
            continue
        missing.append(tag)
    return missing


# the files that write TensorBoard tags: loss terms, components' scalars, the monitor and the recipes
TAG_WRITERS = ("codir_ds/distill/methods/*.py", "codir_ds/distill/*component*.py", "codir_ds/distill/diagnostics.py",
               "codir_ds/engine/monitor.py", "codir_ds/recipes/*.py")


def test_every_tag_in_the_code_is_declared_and_documented():
    """Every literal ``prefix/name`` in the files that write tags, whatever its prefix, is declared (by a method,
    a component, the run or the metrics) and in docs/running.md."""
    from codir_ds.tag_reference import all_tags
    literal = set()
    for pattern in TAG_WRITERS:
        for path in REPO.glob(pattern):
            literal |= set(re.findall(r"[\"']([a-z]+/[a-z0-9_]+)[\"']", path.read_text()))
    assert {"loss/total", "bank/pos_sim", "crd/student_norm", "train/lr", "perf/samples_per_s"} <= literal
    assert not literal - all_tags(), f"declare these tags (a method's or component's tags): {literal - all_tags()}"
    assert not undocumented_tags(all_tags()), f"run {COMMAND}"
    from codir_ds.data.metrics import METRICS
    assert {f"eval/{name}" for name in METRICS} <= all_tags()


def test_the_tag_reference_is_generated_from_the_declarations():
    from codir_ds.doc_blocks import current
    from codir_ds.tag_reference import BEGIN, END, render
    assert current(RUNNING, BEGIN, END) == render(), f"stale: run {COMMAND}"


def test_the_method_index_is_generated_from_the_registry():
    from codir_ds.doc_blocks import current
    from codir_ds.method_index import BEGIN, COMMAND as INDEX_COMMAND, END, OUTPUT, render
    assert current(OUTPUT, BEGIN, END) == render(), f"stale: run {INDEX_COMMAND}"
    assert "| [ctcd](ctcd.md) |" in render() and "only with `method.ctcd_one_way`" in render()


def test_undocumented_tags_finds_new_ones():
    assert undocumented_tags({"loss/total", "eval/large_accuracy", "eval/mlm_loss"}) == []
    assert undocumented_tags({"loss/new_term", "eval/large_new_metric"}) == ["eval/large_new_metric", "loss/new_term"]
