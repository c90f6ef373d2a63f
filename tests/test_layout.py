"""The code base's shape: no import cycles, no method-name branches outside the registry, short functions."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "codir_ds"
METHODS_DIR = PACKAGE / "distill" / "methods"
MAX_FUNCTION_LINES = 60
# Functions allowed to be longer, with the reason.
LONG_FUNCTIONS: dict[str, str] = {}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every codir_ds module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def test_no_import_cycles_between_codir_ds_modules():
    mods = modules()
    graph = {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of the code's layers.
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_method_name_branches_outside_the_registry():
    from codir_ds.distill.methods import method_names
    names = set(method_names())
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if METHODS_DIR in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"method-name comparisons outside codir_ds/distill/methods/: {offenders}"


def test_functions_are_short():
    long = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                key = f"{path.relative_to(REPO)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long.append(f"{key} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them or give a reason): {long}"


def method_option_reads(path: Path, root: Path = REPO) -> list[str]:
    """``cfg.method.<option>`` reads (``name`` aside) in ``path``, directly or through an alias of the section
    (``m = cfg.method``): ``file:line option``."""
    tree = ast.parse(path.read_text())
    aliases = set()
    for node in ast.walk(tree):  # m = self.cfg.method / m = cfg.method / m, t = cfg.method, cfg.training
        if isinstance(node, ast.Assign):
            pairs = []
            for target in node.targets:
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs += list(zip(target.elts, node.value.elts))
                else:
                    pairs.append((target, node.value))
            for target, value in pairs:
                if isinstance(target, ast.Name) and isinstance(value, ast.Attribute) and value.attr == "method" \
                        and isinstance(value.value, (ast.Name, ast.Attribute)) and \
                        getattr(value.value, "attr", getattr(value.value, "id", "")) == "cfg":
                    aliases.add(target.id)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr == "name":
            continue
        base = node.value
        via_cfg = isinstance(base, ast.Attribute) and base.attr == "method" and \
            getattr(base.value, "attr", getattr(base.value, "id", "")) == "cfg"
        via_alias = isinstance(base, ast.Name) and base.id in aliases
        if via_cfg or via_alias:
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.attr}")
    return found


def test_no_recipe_reads_a_method_option():
    """A recipe learns what a method needs from the method (its specs and properties),
    never from ``cfg.method.<option>``: a new method's options are its own."""
    reads = [r for path in sorted((PACKAGE / "recipes").glob("*.py")) for r in method_option_reads(path)]
    assert not reads, reads


def test_the_option_read_check_finds_reads(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(self, cfg):\n    m = cfg.method\n    a = self.cfg.method.pooling\n    b = m.bank_init\n"
                     "    c = cfg.method.name\n")
    found = [r.split(" ")[1] for r in method_option_reads(probe, tmp_path)]
    assert sorted(found) == ["bank_init", "pooling"]
