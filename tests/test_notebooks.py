"""Notebook hygiene: committed clean, standard kernel, Colab-ready first cell, figures saved properly."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "helpers"
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


# --------------------------------------------------------------------------- where figures go
#
# Every figure a notebook saves must land in report/figures/ (the report is assembled from
# there): notebooks save through helpers.viz (``name=...``) or ``save_figure(fig, name)``, whose
# default folder is ``config.figures_dir()``. The checks below read the code (``ast``), they do not
# run it.

#: Calls that write an image file wherever their argument points.
RAW_IMAGE_WRITERS = {"savefig", "save_png", "imsave", "imwrite"}
#: The only functions of the package that call ``savefig`` themselves, and why that is fine.
SAVEFIG_ALLOWED = {
    ("viz/common.py", "save_figure"): "the one writer of report figures (report/figures/)",
    ("viz/common.py", "figure_png"): "renders into an in-memory buffer, writes no file",
    ("viz/predict.py", "save_png"): "overlays of the predict command, written where its user asks",
    ("tools/report.py", "write_figure_sheet"): "the report's PDF sheet of the figures in report/figures",
}


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _is_figures_dir(node: ast.expr) -> bool:
    """``None`` or a call of ``figures_dir()``: save_figure's own default folder."""
    if isinstance(node, ast.Constant) and node.value is None:
        return True
    return isinstance(node, ast.Call) and _call_name(node) == "figures_dir" and not node.args


def _save_figure_problem(call: ast.Call) -> str | None:
    """Why a ``save_figure`` call might write outside report/figures (None: it cannot)."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return "passes *args/**kwargs, which may hold a folder"
    folders = call.args[2:3] + [k.value for k in call.keywords if k.arg == "folder"]
    bad = [f for f in folders if not _is_figures_dir(f)]
    return f"passes the folder {ast.unparse(bad[0])}" if bad else None


def _code_tree(source: str) -> ast.Module:
    """A notebook cell as Python: IPython magics and shell lines (``%``, ``!``) become blank."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def figure_writes_outside_report(source: str, save_figure_names=("save_figure",)) -> list[str]:
    """Problems of one cell's code: figure saves that may not land in report/figures/."""
    tree = _code_tree(source)
    names = set(save_figure_names)
    for node in ast.walk(tree):  # ``from helpers.viz.common import save_figure as keep``
        if isinstance(node, ast.ImportFrom):
            names |= {a.asname for a in node.names if a.name == "save_figure" and a.asname}
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name in RAW_IMAGE_WRITERS:
            problems.append(
                f"line {node.lineno}: {ast.unparse(node.func)}(...) writes wherever its argument "
                "points; save figures with a helpers.viz function (name=...) or "
                "save_figure(fig, name), which write to report/figures/"
            )
        elif name in names and (why := _save_figure_problem(node)):
            problems.append(
                f"line {node.lineno}: {ast.unparse(node)} {why}; leave the folder out so the "
                "figure goes to report/figures/"
            )
    return problems


def test_figure_check_recognises_saves_elsewhere():
    bad = [
        'plt.savefig("density.png")',
        "fig.savefig(RUN_DIR / 'curve.pdf', dpi=200)",
        'save_figure(fig, "02_kernels", "figures")',
        "save_figure(fig, '02_kernels', folder=Path.home())",
        "from helpers.viz.common import save_figure as keep\nkeep(fig, 'x', folder='/tmp')",
        "helpers.viz.common.save_figure(fig, 'x', *where)",
        'save_png(fig, "overlay.png")',
        "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.imsave('x.png', img)",
    ]
    for code in bad:
        assert figure_writes_outside_report(code), code
    good = [
        'save_figure(fig, "02_kernels")',
        "paths = save_figure(fig, f'06_overlay_{name}', folder=config.figures_dir())",
        'viz.density.plot_kernels(params, name="02_kernels")',
        "!pip install -q something\nfigure_png(fig)",
    ]
    for code in good:
        assert figure_writes_outside_report(code) == [], code


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_figures_land_in_report_figures(path):
    nb = json.loads(path.read_text())
    problems = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        try:
            found = figure_writes_outside_report(source)
        except SyntaxError as exc:
            found = [f"line {exc.lineno}: does not parse as Python ({exc.msg})"]
        first = next((line for line in source.splitlines() if line.strip()), "")[:60]
        problems += [f"{path.name} cell {index} ({first!r}...), {p}" for p in found]
    assert not problems, "figures saved outside report/figures/:\n" + "\n".join(problems)


def _enclosing_functions(tree: ast.Module, target: ast.AST) -> list[str]:
    """Names of the functions that contain ``target``, outermost first."""
    return [f.name for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(n is target for n in ast.walk(f))]


def test_package_saves_figures_only_into_report_figures():
    """Every ``savefig`` of helpers is a known, allowed one, and no ``save_figure`` call in helpers
    passes another folder: helpers.viz functions given ``name=`` save into report/figures/."""
    problems = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            name = _call_name(node) if isinstance(node, ast.Call) else None
            if name not in ("savefig", "save_figure"):
                continue
            functions = _enclosing_functions(tree, node)
            where = f"helpers/{rel}:{node.lineno} in {functions[-1] if functions else '<module>'}"
            if name == "savefig" and not any((rel, f) in SAVEFIG_ALLOWED for f in functions):
                problems.append(f"{where}: {ast.unparse(node)} bypasses save_figure")
            elif name == "save_figure" and (why := _save_figure_problem(node)):
                problems.append(f"{where}: save_figure {why}")
    assert not problems, "figures saved outside report/figures/:\n" + "\n".join(problems)
    for rel, function in SAVEFIG_ALLOWED:
        assert f"def {function}(" in (PACKAGE_DIR / rel).read_text(), (
            f"SAVEFIG_ALLOWED names helpers/{rel}:{function}, which no longer exists"
        )


def test_save_figure_default_folder_is_report_figures(isolated_home):
    from matplotlib.figure import Figure

    from helpers import config
    from helpers.viz.common import save_figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    paths = save_figure(fig, "../02 kernels/of heads")  # a name cannot point elsewhere either
    figures = (isolated_home / "report" / "figures").resolve()
    assert config.figures_dir() == figures
    assert [p.parent for p in paths] == [figures, figures]
    assert sorted(p.suffix for p in figures.iterdir()) == [".pdf", ".png"]
