"""The house keeps its shape: every name docs/DESIGN.md lists exists, no module in sinder_hub/ is over 500
lines, and no function in sinder_hub/ or tools/ is over 80 lines."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def design_rows() -> dict[str, list[str]]:
    """``{module: [names]}``: every backquoted name of a ``sinder_hub/...py`` row of DESIGN.md's tables."""
    rows = {}
    for line in (ROOT / "docs" / "DESIGN.md").read_text().splitlines():
        match = re.match(r"\| `(sinder_hub/[\w/]+)\.py` \|[^|]*\| (.*) \|$", line)
        if match:
            module = match[1].replace("/", ".").removesuffix(".__init__")
            rows[module] = re.findall(r"`([A-Za-z_][\w]*)", match[2])
    return rows


def design_names() -> list[tuple[str, str]]:
    return [(module, name) for module, names in design_rows().items() for name in names]


def test_design_lists_modules():
    modules = {module for module, _ in design_names()}
    assert len(modules) >= 20, modules


@pytest.mark.parametrize(("module", "name"), design_names())
def test_every_name_design_lists_is_importable(module, name):
    """A module-level name, or a method of a class the same row lists (``RepairConfig`` ... ``validate()``)."""
    imported = importlib.import_module(module)
    classes = [getattr(imported, other, None) for other in design_rows()[module]]
    found = hasattr(imported, name) or any(isinstance(c, type) and hasattr(c, name) for c in classes)
    assert found, f"docs/DESIGN.md lists {module}.{name}"


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def test_no_module_is_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in python_files("sinder_hub")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_80_lines():
    long = {}
    for path in python_files("sinder_hub", "tools"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
