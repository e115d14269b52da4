"""The two layers of ``helpers``: a small core a student reads, and the tools behind it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from helpers.tools.size import MAX_CORE_LINES, MAX_FUNCTION_LINES, core_files, core_size

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    """Every module named by an import anywhere in ``path`` (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_core_size_within_budget():
    size = core_size()
    assert size["total"] <= MAX_CORE_LINES, size["modules"]
    assert size["longest"][0] <= MAX_FUNCTION_LINES, size["longest"]


def test_function_lengths_counts_methods_and_nested(tmp_path):
    from helpers.tools.size import function_lengths

    f = tmp_path / "m.py"
    f.write_text("class A:\n    def m(self):\n        def inner():\n            pass\n        return 1\n")
    assert function_lengths(f) == [(4, "A.m"), (2, "A.m.inner")]


def test_core_never_imports_tools_or_analysis():
    """``__main__.py`` is exempt: it is the command-line entry point, which lives in the tools."""
    offenders = {p.name: sorted(m for m in _imported_modules(p)
                                if m.startswith(("helpers.tools", "helpers.analysis", "helpers.viz")))
                 for p in core_files() if p.name != "__main__.py"}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_core_holds_no_argparse():
    assert not [p.name for p in core_files() if "argparse" in _imported_modules(p)]


def test_core_functions_have_interface_docstrings():
    """Every public function of the core states its interface (cs231n style)."""
    missing = []
    for path in core_files():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node) or ""
                if "Inputs:" not in doc and "Returns:" not in doc:
                    missing.append(f"{path.name}:{node.name}")
    assert not missing, missing


def test_notebooks_call_no_private_helper_names():
    pattern = re.compile(r"\b(?:helpers(?:\.\w+)*|[a-z_]+)\._[a-z]\w*")
    offenders = []
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        imported = set(re.findall(r"from helpers[\w.]* import ([\w, ]+)", code))
        aliases = {a.split(" as ")[-1].strip() for line in imported for a in line.split(",")}
        for hit in pattern.findall(code):
            owner = hit.split("._")[0]
            if owner.startswith("helpers") or owner in aliases:
                offenders.append(f"{nb.name}: {hit}")
    assert not offenders, offenders


def test_one_alias_per_helpers_module_across_notebooks():
    seen: dict[str, set[str]] = {}
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for package, names in re.findall(r"^\s*from (helpers(?:\.\w+)?) import ([\w, ]+)$", code, re.M):
            for item in names.split(","):
                name, _, alias = item.strip().partition(" as ")
                module = f"{package}.{name}"
                if (ROOT / (module.replace(".", "/") + ".py")).exists():
                    seen.setdefault(module, set()).add(alias or name)
    assert {m: a for m, a in seen.items() if len(a) > 1} == {}
