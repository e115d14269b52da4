"""The size of the core a student reads: lines per module of ``helpers/*.py``, the total, and the
longest functions (``make size``; the goal is at most 3,000 lines and no function over 60)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE_DIR = Path(__file__).resolve().parents[1]
MAX_CORE_LINES = 3000
MAX_FUNCTION_LINES = 60


def core_files(folder: Path = CORE_DIR) -> list[Path]:
    """The core modules: the ``.py`` files directly in ``helpers/`` (not its subpackages)."""
    return sorted(folder.glob("*.py"))


def function_lengths(path: Path) -> list[tuple[int, str]]:
    """``(lines, qualified name)`` of every function and method in ``path``, longest first."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((child.end_lineno - child.lineno + 1, f"{prefix}{child.name}"))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return sorted(found, reverse=True)


def core_size(folder: Path = CORE_DIR) -> dict:
    """Lines per core module, their total, and the longest function as ``(lines, "file:name")``."""
    lines = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in core_files(folder)}
    longest = max(((n, f"{p.name}:{name}") for p in core_files(folder)
                   for n, name in function_lengths(p)), default=(0, ""))
    return {"modules": lines, "total": sum(lines.values()), "longest": longest}


def main() -> int:
    size = core_size()
    for name, n in sorted(size["modules"].items(), key=lambda kv: -kv[1]):
        print(f"{n:6d}  helpers/{name}")
    print(f"{size['total']:6d}  total (goal <= {MAX_CORE_LINES})")
    n, where = size["longest"]
    print(f"longest function: {where}, {n} lines (goal <= {MAX_FUNCTION_LINES})")
    return 0 if size["total"] <= MAX_CORE_LINES and n <= MAX_FUNCTION_LINES else 1


if __name__ == "__main__":
    raise SystemExit(main())
