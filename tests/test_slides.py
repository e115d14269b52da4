"""Figures a student can put on a slide (issue 13 §6): captions under the figures, the slide style,
the 16:9 figure sheet, every saved name in the catalogue, and 05's per-image browser."""

from __future__ import annotations

import ast
import base64
import inspect
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import viz  # noqa: E402
from helpers.tools import report  # noqa: E402
from helpers.tools.evaluate import evaluate_predictor  # noqa: E402
from helpers.viz import browser, common, evaluation, training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


HISTORY = [{"epoch": e, "train_loss": 1.0 / e, "val_mae": 10.0 / e, "val_rmse": 12.0 / e} for e in range(1, 5)]


# --------------------------------------------------------------------------- slide style


def _font_sizes(fig) -> dict[str, float]:
    ax = fig.axes[0]
    return {"label": ax.xaxis.label.get_fontsize(), "tick": ax.get_xticklabels()[0].get_fontsize()}


def test_slide_style_is_16_9_with_larger_fonts_and_lines(isolated_home):
    normal = training.plot_history(HISTORY, title="t")
    with viz.slide_style():
        slide = training.plot_history(HISTORY, title="t", name="03_history_B")
        assert common.in_slide_style()
    assert not common.in_slide_style()
    width, height = slide.get_size_inches()
    assert width / height == pytest.approx(16 / 9, rel=1e-3)
    assert normal.get_size_inches()[0] / normal.get_size_inches()[1] != pytest.approx(16 / 9, rel=1e-2)
    small, large = _font_sizes(normal), _font_sizes(slide)
    assert large["label"] >= 1.5 * small["label"] and large["tick"] >= 1.5 * small["tick"]
    lines = [ln.get_linewidth() for ln in slide.axes[0].get_lines()]
    assert lines and min(lines) >= 2 * matplotlib.rcParams["lines.linewidth"] - 1e-9
    # saved like any figure, under its catalogue name
    assert (isolated_home / "report" / "figures" / "03_history_B.png").is_file()
    # the style is gone afterwards: the next figure is a normal one
    assert _font_sizes(training.plot_history(HISTORY)) == small


def test_figure_sheet_pages_are_16_9_slides(isolated_home):
    folder = isolated_home / "report" / "figures"
    fig = evaluation.count_scatter({"m": (np.array([1.0, 5.0, 9.0]), np.array([2.0, 4.0, 10.0]))},
                                   name="05_count_scatter_B")
    (found,), unknown = report.find_figures(folder)
    assert not unknown and found.name == "05_count_scatter_B"
    page = report.sheet_page(found, 1, "t")
    width, height = page.get_size_inches()
    assert width / height == pytest.approx(16 / 9, rel=1e-3)
    assert page._suptitle.get_fontsize() == common.SLIDE_RC["font.size"]
    assert report.write_figure_sheet([found], folder / "sheet.pdf") == 1
    box = re.search(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", (folder / "sheet.pdf").read_bytes())
    assert float(box.group(1)) / float(box.group(2)) == pytest.approx(16 / 9, rel=1e-3)
    del fig


# --------------------------------------------------------------------------- captions under figures


def test_caption_is_displayed_under_the_figure(isolated_home):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.display import display
    from IPython.utils.capture import capture_output

    fig = evaluation.count_scatter({"m": (np.array([1.0, 5.0]), np.array([2.0, 4.0]))}, name="05_count_scatter_B")
    InteractiveShell.instance()
    try:
        with capture_output() as captured:
            display(fig)  # what the inline backend does at the end of the cell, or `fig` as its value
    finally:
        InteractiveShell.clear_instance()
    kinds = [next(k for k in ("image/png", "text/markdown") if k in out.data) for out in captured.outputs]
    assert kinds == ["image/png", "text/markdown"]  # the figure, then its caption under it
    assert base64.b64decode(captured.outputs[0].data["image/png"])[:8] == PNG
    caption = captured.outputs[1].data["text/markdown"]
    assert caption == f"**Figure `05_count_scatter_B`.** {report.figure_caption('05_count_scatter_B')}"
    assert caption.endswith("(part B).")
    # a figure that is not saved has no caption, and an unknown name says it is not catalogued
    plain, _ = common.new_figure()
    assert not hasattr(plain, "_ipython_display_")
    common.save_figure(plain, "my_own_plot")
    assert "not in the figure catalogue" in plain._ipython_display_.args[1]


def _static_names(node: ast.AST) -> str | None:
    """A figure name in notebook code: a string, the constant start of an f-string + "X", or the
    left side of ``"stem" + suffix``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        head = "".join(v.value for v in node.values[: next((i for i, v in enumerate(node.values)
                                                            if not isinstance(v, ast.Constant)), None)])
        return head + "X" if head else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # "04_overfit_one_batch" + suffix
        return _static_names(node.left)
    return None


def _notebook_figure_names() -> dict[str, str]:
    """Every figure name the notebooks save: ``name=...`` of helpers calls and save_figure's second
    argument; plus the default names of the viz functions. Maps name to where it is."""
    names = {}
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for k, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, ast.Call):
                    continue
                args = [kw.value for kw in node.keywords if kw.arg == "name"]
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if func == "save_figure" and len(node.args) >= 2:
                    args.append(node.args[1])
                for arg in args:
                    name = _static_names(arg)
                    if name is not None and re.match(r"\d\d_", name):
                        names[name] = f"{path.name} cell {k}"
    for module in (viz.dataset, viz.density, viz.evaluation, viz.models, viz.csrnet, viz.points,
                   viz.predict, viz.training):
        for fname, fn in inspect.getmembers(module, inspect.isfunction):
            default = inspect.signature(fn).parameters.get("name")
            if default is not None and isinstance(default.default, str):
                names[default.default] = f"{module.__name__}.{fname}"
    return names


def test_every_figure_name_saved_by_the_notebooks_is_in_the_catalogue():
    import helpers.viz.csrnet  # noqa: F401  (the submodules, for their default names)
    import helpers.viz.dataset  # noqa: F401
    import helpers.viz.density  # noqa: F401
    import helpers.viz.models  # noqa: F401
    import helpers.viz.points  # noqa: F401
    import helpers.viz.predict  # noqa: F401

    names = _notebook_figure_names()
    assert len(names) >= 30  # the notebooks save dozens of figures: the scan found them
    missing = {n: where for n, where in names.items() if report.match_figure(n) == (None, None)}
    assert not missing, f"figure names without a caption in helpers/tools/report.py FIGURES: {missing}"


# --------------------------------------------------------------------------- 05's browser


class _Halves:
    """A predictor that counts half of the true heads: its error grows with the crowd."""

    def __init__(self, truth: dict[int, int]) -> None:
        self.truth = truth

    def __call__(self, image):
        count = 0.5 * self.truth[int(image.shape[1])]
        density = np.full(image.shape[:2], count / (image.shape[0] * image.shape[1]))
        return count, density, None


@pytest.fixture()
def scored(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("CROWD_CACHE", str(tmp_path / "cache"))  # evaluation caches true density maps

    from helpers.data import list_records
    from helpers.tools.synth import write_points_mat

    images = tmp_path / "part_B" / "test_data" / "images"
    gts = tmp_path / "part_B" / "test_data" / "ground-truth"
    images.mkdir(parents=True)
    gts.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    for i, k in enumerate([4, 40, 12, 25], start=1):
        w = 60 + i  # the width identifies the image for the predictor
        Image.fromarray((rng.random((48, w, 3)) * 255).astype(np.uint8)).save(images / f"IMG_{i}.jpg")
        write_points_mat(gts / f"GT_IMG_{i}.mat", np.column_stack([rng.uniform(0, w, k), rng.uniform(0, 48, k)]))
        truth[w] = k
    records = list_records("B", "test", tmp_path)
    predictor = _Halves(truth)
    return evaluate_predictor(predictor, records, name="halves", keep_maps=1, progress=False), predictor, records


def test_browser_shows_images_sorted_by_error(scored):
    result, predictor, records = scored
    b = browser.PredictionBrowser(result, predictor, records)
    assert [r["true_count"] for r in b.rows] == [40, 25, 12, 4]  # error = half the count: largest first
    assert (b.slider.min, b.slider.max, b.slider.value) == (0, 3, 0)
    assert "1 of 4" in b.html.value and "truth <b>40</b>" in b.html.value and "error <b>-20.0</b>" in b.html.value
    assert "too few" in b.html.value and b.image.value[:8] == PNG
    first = b.image.value
    b.slider.value = 2  # what moving the slider does: the callback redraws
    assert "3 of 4" in b.html.value and "truth <b>12</b>" in b.html.value and "predicted <b>6.0</b>" in b.html.value
    assert b.image.value[:8] == PNG and b.image.value != first
    # an image that was not kept is predicted on demand; without a predictor it says so
    kept_only = browser.PredictionBrowser(result)
    kept_only.show(1)  # 25 heads: neither the best nor the worst
    assert kept_only.image.value == b"" and "not kept" in kept_only.html.value
    kept_only.show(3)
    assert kept_only.image.value[:8] == PNG
    # only widgets that ipywidgets 7.7 and 8 share
    assert [type(w).__name__ for w in b.widget.children] == ["IntSlider", "HTML", "Image"]


def test_browser_with_ipywidgets_7(tmp_path):
    """The same browser test under ipywidgets 7.7.1 (the overlay `make test` installs in
    build/ipywidgets7, as Colab ships 7.7); skipped when the overlay is not there."""
    import os
    import subprocess
    import sys

    overlay = REPO / "build" / "ipywidgets7"
    if not (overlay / "ipywidgets").is_dir():
        pytest.skip("no ipywidgets 7.7.1 overlay in build/ipywidgets7 (make test installs it)")
    env = dict(os.environ, PYTHONPATH=str(overlay), OMP_NUM_THREADS="1")
    code = ("import ipywidgets, sys, pytest; assert ipywidgets.__version__ == '7.7.1', ipywidgets.__version__; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'sorted_by_error', {str(Path(__file__))!r}]))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_a_saved_figure_shows_once_with_its_caption_in_a_real_kernel(tmp_path):
    """The figure is the cell's value and still open at the end of the cell: shown once, not twice."""
    import nbformat
    from nbclient import NotebookClient

    code = ("%matplotlib inline\nimport os\nos.environ['CROWD_HOME'] = " + repr(str(tmp_path)) + "\n"
            "from helpers.viz.common import new_figure, save_figure\n"
            "fig, ax = new_figure()\nax.plot([0, 1], [0, 1])\n"
            "save_figure(fig, '01_count_histograms')\nfig")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    captions = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(images) == 1, outputs
    assert len(captions) == 1 and captions[0].startswith("**Figure `01_count_histograms`.**")
