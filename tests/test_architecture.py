"""The package's shape: imports follow the layer order of docs/design.md, no import cycle, modules
of at most 450 lines, and no ``mag`` import inside a function body unless marked ``# lazy: <why>``.

The layer order is parsed from the doc, so the doc is the single source; every module under ``mag/``
is walked with ``ast`` (module-level, function-level and ``TYPE_CHECKING`` imports alike).
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mag"
DESIGN = REPO / "docs" / "design.md"
MAX_MODULE_LINES = 450
LAZY_MARK = "# lazy:"
LAYER_LINE = re.compile(r"^\d+\.\s+\*\*(?P<name>[^*]+)\*\*:\s*(?P<modules>.+)$")
MODULE_NAME = re.compile(r"`(mag(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (``from a.b import c`` -> ``a.b``)
    line: int
    in_function: bool
    lazy: bool


def parse_layers(text: str) -> dict[str, int]:
    """``{module name: layer index}`` from the "Layer order" section of docs/design.md."""
    section = text.split("## Layer order", 1)
    if len(section) != 2:
        raise AssertionError("docs/design.md has no '## Layer order' section")
    layers: dict[str, int] = {}
    index = 0
    for line in section[1].splitlines():
        if line.startswith("## "):
            break
        match = LAYER_LINE.match(line.strip())
        if match is None:
            continue
        for name in MODULE_NAME.findall(match["modules"]):
            if name in layers:
                raise AssertionError(f"docs/design.md names {name} in two layers")
            layers[name] = index
        index += 1
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest listed name covering ``module``; bare ``mag`` covers only itself."""
    if module in layers:
        return layers[module]
    parts = module.split(".")
    for end in range(len(parts) - 1, 1, -1):
        prefix = ".".join(parts[:end])
        if prefix in layers:
            return layers[prefix]
    return None


def _is_mag(name: str) -> bool:
    return name == "mag" or name.startswith("mag.")


def imports_of(path: Path) -> list[Import]:
    """Every import of a ``mag`` module in ``path``, with whether it sits in a function body."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node,
                      ast.ImportFrom) and node.level == 0 and node.module and _is_mag(node.module):
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if _is_mag(alias.name)]
        else:
            continue
        lazy = LAZY_MARK in lines[node.lineno - 1]
        found += [Import(module_name(path), t, node.lineno, id(node) in in_function,
                         lazy) for t in targets]
    return found


def check(files: dict[Path, str], design: str) -> list[str]:
    """Every violation of the rules in the module docstring, one line each (empty: none)."""
    layers = parse_layers(design)
    problems = []
    graph: dict[str, set[str]] = {}
    for path, _ in files.items():
        name = module_name(path)
        rel = path.relative_to(REPO)
        source_layer = layer_of(name, layers)
        if source_layer is None:
            problems.append(f"{rel}: module {name} is in no layer of docs/design.md")
            continue
        count = len(path.read_text().splitlines())
        if count > MAX_MODULE_LINES:
            problems.append(f"{rel}: {count} lines (at most {MAX_MODULE_LINES})")
        for imp in imports_of(path):
            target_layer = layer_of(imp.target, layers)
            if target_layer is None:
                problems.append(f"{rel}:{imp.line}: imports {imp.target}, which is in no layer")
            elif target_layer > source_layer:
                problems.append(f"{rel}:{imp.line}: upward import of {imp.target} (layer "
                                f"{target_layer + 1})"
                                f" from layer {source_layer + 1}")
            if imp.in_function and not imp.lazy:
                problems.append(f"{rel}:{imp.line}: import of {imp.target} inside a function body "
                                "without"
                                f" a '{LAZY_MARK} <why>' comment")
            if not imp.in_function and imp.target != name:
                graph.setdefault(name, set()).add(imp.target)
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of module-level imports (iterative DFS colouring)."""
    state: dict[str, int] = {}
    cycles = []
    for root in sorted(graph):
        if state.get(root):
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph.get(root, ())))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return cycles


def _package_files() -> dict[Path, str]:
    return {path: module_name(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_design_doc_lists_layers_bottom_to_top():
    layers = parse_layers(DESIGN.read_text())
    assert layers["mag.errors"] == 0
    assert (
        layers["mag.cache"] < layers["mag.models"] < layers["mag.pipelines"] < layers["mag.train"]
    )
    assert layers["mag.train"] < layers["mag.app"] < layers["mag.bench"] < layers["mag.cli"]


def test_every_module_follows_the_layer_order_of_the_design_doc():
    problems = check(_package_files(), DESIGN.read_text())
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("planted, expected", [
    ("from mag.pipelines import StreamingGenerator\n", "upward import of mag.pipelines"),
    ("def f():\n    from mag.config import Preset\n    return Preset\n", "inside a function body"),
    ("\n" * (MAX_MODULE_LINES + 1), "lines (at most"),
], ids=["upward", "function-body", "too-long"])
def test_a_planted_violation_is_reported(tmp_path, monkeypatch, planted, expected):
    """The check is not vacuous: a violation planted in a copy of mag/cache/kv.py is reported."""
    kv = PACKAGE / "cache" / "kv.py"
    copy = tmp_path / "kv.py"
    copy.write_text(kv.read_text() + planted)
    files = _package_files()
    real = {path: name for path, name in files.items() if path != kv}
    monkeypatch.setattr(Path, "read_text", _redirect(kv, copy))
    problems = check({**real, kv: files[kv]}, DESIGN.read_text())
    assert any(expected in p and "mag/cache/kv.py" in p for p in problems), problems


def test_a_planted_cycle_is_reported():
    graph = {"mag.a": {"mag.b"}, "mag.b": {"mag.c"}, "mag.c": {"mag.a"}, "mag.d": {"mag.a"}}
    cycles = _cycles(graph)
    assert len(cycles) == 1 and set(cycles[0]) == {"mag.a", "mag.b", "mag.c"}



def test_package_data_globs_match_shipped_files():
    """Every package-data pattern in pyproject.toml must ship something: the shipped models and the
    viewer page leave a wheel silently when their folder is renamed and the pattern is not."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    patterns = data["mag"]
    assert "shipped/**/*" in patterns
    for pattern in patterns:
        assert any(p.is_file() for p in PACKAGE.glob(pattern)), (
            f"{pattern} matches no file under mag/"
        )
    assert {p.name for p in (PACKAGE / "shipped").glob("*.safetensors")} >= {
        "tiny-causal-long.safetensors",
        "tiny-memory.safetensors",
    }

def _redirect(original: Path, replacement: Path):
    read = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        return read(replacement if self == original else self, *args, **kwargs)

    return read_text
