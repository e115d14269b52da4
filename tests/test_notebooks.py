"""Notebook hygiene: committed clean, standard kernel, Colab-ready first cell, figures saved properly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
COLAB_CELL = (NOTEBOOK_DIR / "colab_cell.py").read_text()


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no numbered notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_clean_with_standard_kernel(path):
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    spec = nb["metadata"].get("kernelspec", {})
    assert spec.get("name") == "python3" and spec.get("language") == "python"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name}: a code cell has outputs"
            assert cell.get("execution_count") is None, f"{path.name}: a code cell has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_the_colab_setup(path):
    nb = json.loads(path.read_text())
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "".join(first_code["source"]).strip() == COLAB_CELL.strip()
    assert nb["cells"][0]["cell_type"] == "markdown", "a notebook opens with its title and goals"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_teaching_structure(path):
    nb = json.loads(path.read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert re.search(r"learning goals", text, re.I), "learning goals at the top"
    assert re.search(r"exercise", text, re.I), "exercises at the end"
    assert "$" in text, "the maths, in LaTeX"
    assert "assert " in code, "check cells"
    assert "sys.path" not in code.replace(COLAB_CELL, ""), "install the package instead of patching sys.path"
    # figures go through helpers.viz (save_figure into report/figures), never plt.savefig by hand
    assert "savefig(" not in code
