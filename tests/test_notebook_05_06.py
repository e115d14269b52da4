"""Checks moved out of notebooks 05 and 06 (they test software, not the method), and the numbers
their text states (tile margins, measured speed-ups), kept true by computing or reading them."""

from __future__ import annotations

import io
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_05 = ROOT / "notebooks" / "05_evaluation.ipynb"
NOTEBOOK_06 = ROOT / "notebooks" / "06_count_your_own_image.ipynb"


def _markdown(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def small_model():
    import torch

    from helpers import models

    torch.manual_seed(0)
    return models.HeatmapCNN().eval()


# --------------------------------------------------------------------------- notebook 06: uploads


@pytest.mark.parametrize("widgets_version", ["8.x", "7.x"])
def test_an_upload_is_saved_and_counted_like_the_same_pixels(widgets_version, tmp_path, small_model):
    """What notebook 06's upload button does: the file lands under a safe name, and counting it
    gives exactly the count of the pixels it holds (PNG is lossless)."""
    from helpers import predict
    from helpers.tools import runs

    drawn = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    content = _png_bytes(drawn)
    item = {"name": "drawn crowd.png", "type": "image/png", "size": len(content),
            "content": memoryview(content), "last_modified": datetime.now(timezone.utc)}
    # ipywidgets 8: a tuple of dicts; ipywidgets 7: a dict of dicts by file name
    value = (item,) if widgets_version == "8.x" else {"drawn crowd.png": {**item, "name": None}}
    saved = runs.save_upload(value, folder=tmp_path)
    assert saved == tmp_path / "drawn_crowd.png" and saved.read_bytes() == content
    pixels = predict.load_image(saved)
    assert np.array_equal(pixels, drawn)
    from_file = predict.count(pixels, small_model, scale=1.0, input_scale=1.0)
    direct = predict.count(drawn, small_model, scale=1.0, input_scale=1.0)
    assert from_file.count == direct.count and np.array_equal(from_file.density_lowres, direct.density_lowres)


def test_an_upload_without_content_is_refused(tmp_path):
    """A browser upload that arrived empty: a clear error in the panel, and no file written."""
    from helpers.errors import CrowdError
    from helpers.tools import runs

    with pytest.raises(CrowdError, match="no content"):
        runs.save_upload(({"name": "x.png", "content": None},), folder=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- figures and result files


def test_saved_figures_are_a_png_and_a_pdf_in_report_figures(isolated_home):
    """Notebook 06's save button: two files per figure in report/figures, real PNG and PDF files."""
    from matplotlib.figure import Figure

    from helpers import config
    from helpers.viz import save_figure

    fig = Figure(figsize=(2, 1.5))
    fig.add_subplot().imshow(np.arange(12.0).reshape(3, 4))
    paths = save_figure(fig, "06_overlay_IMG_1")
    assert sorted(p.name for p in paths) == ["06_overlay_IMG_1.pdf", "06_overlay_IMG_1.png"]
    assert all(p.is_file() and p.parent == config.figures_dir() for p in paths)
    png = next(p for p in paths if p.suffix == ".png").read_bytes()
    pdf = next(p for p in paths if p.suffix == ".pdf").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and pdf[:5] == b"%PDF-"


def test_results_files_hold_every_row(tmp_path):
    """Notebook 05's results table: every row (a '|' in a name escaped) in results.md, and every
    model's MAE in results.json."""
    from helpers.tools import baselines, evaluate

    published = {f"{k}, not reproduced here": v for k, v in baselines.published_summaries("B").items()}
    table = {"HeatmapCNN | width 16": {"images": 3, "mae": 12.25, "rmse": 15.5},
             "mean count (baseline)": {"images": 3, "mae": 40.0, "rmse": 41.0}, **published}
    md_path, json_path = evaluate.write_results(table, tmp_path)
    text = md_path.read_text()
    saved = json.loads(json_path.read_text())
    assert "HeatmapCNN \\| width 16" in text
    for label, summary in table.items():
        assert label.replace("|", "\\|") in text, label
        assert saved[label]["mae"] == pytest.approx(summary["mae"], rel=1e-9), label
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 1 + len(table)


# --------------------------------------------------------------------------- numbers stated in the text


def test_notebook_06_states_the_tile_margins_that_count_uses():
    """Issue 13: the margin formula of notebook 06 must give the numbers stated (80 px, 144 px)."""
    from helpers import models, predict

    text = _markdown(NOTEBOOK_06)
    for net, name in ((models.HeatmapCNN(), "HeatmapCNN"), (models.CSRNet(), "CSRNet")):
        last = models.receptive_field(net)[-1]
        formula = last.jump * math.ceil((last.rf - last.jump) / (2 * last.jump))  # m = s ceil((r - s) / 2s)
        assert formula == predict.context_margin(net), name
        stated = re.search(r"= (\d+)\$ px for " + name, text)
        assert stated, f"notebook 06 no longer states the margin of {name}"
        assert int(stated.group(1)) == formula, (name, stated.group(1), formula)
        assert f"r = {last.rf}" in text or f"{last.rf} for {name}" in text, (name, last.rf)


def test_notebook_06_speedups_are_the_readme_measurements():
    """Issue 13: one set of measured int8 speed-ups, with the CPU they were measured on."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    text = _markdown(NOTEBOOK_06)
    for model in ("CSRNet", "HeatmapCNN"):
        row = next(line for line in readme.splitlines()
                   if line.startswith(f"| inference on a 1024 x 768 image, {model}"))
        speedup = re.search(r"(\d+\.\d+)x", row).group(1)
        assert f"**{speedup} times**" in text, (model, speedup)
        assert f"{speedup}x for {model}" in text, (model, speedup)
    assert "AMD EPYC with" in text and "AVX-512 VNNI" in text
    assert "without VNNI or AMX" in text
    assert "about 7 times" not in text and "about 6 times" not in text  # the old, unmeasured claims


def test_notebook_05_toys_are_stated_as_computed():
    """The GAME and matching toys of notebook 05: the numbers of the text are the helpers'."""
    from helpers import metrics

    text = _markdown(NOTEBOOK_05)
    true_toy = np.zeros((8, 8))
    true_toy[1, 1] = true_toy[2, 6] = true_toy[6, 2] = true_toy[5, 5] = 1.0
    pred_toy = np.zeros((8, 8))
    pred_toy[1, 1], pred_toy[1, 2], pred_toy[2, 6], pred_toy[6, 4], pred_toy[5, 5] = 0.8, 0.3, 1.0, 1.0, 0.9
    for level, stated in ((1, "2.0"), (2, "2.6"), (3, "2.6")):
        assert f"GAME({level})** = {stated}" in text or f"GAME({level}) = {stated}" in text, level
        assert metrics.game(pred_toy, true_toy, level) == pytest.approx(float(stated), abs=1e-12)
    true_pts = np.array([[0.0, 0.0], [10.0, 0.0]])
    pred_pts = np.array([[6.0, 0.0], [15.0, 0.0]])
    assert "$T_0 = (0, 0)$ and $T_1 = (10, 0)$" in text and "$P_0 = (6, 0)$ and $P_1 = (15, 0)$" in text
    assert metrics.match_points(pred_pts, true_pts, 6.0, method="greedy").tp == 1
    assert metrics.match_points(pred_pts, true_pts, 6.0, method="hungarian").tp == 2


def test_notebook_05_measured_game_gap_is_true_on_shanghaitech(real_data_root):
    """The two-GAME cell of notebook 05 states what the ground truth of ShanghaiTech's Part B test
    image with the most heads among the 12 quick images scores against the head points; recomputed
    here with the density maps computed afresh (no cache), so a change of kernels or regions shows."""
    from helpers import data, density, metrics
    from helpers.tools import evaluate

    code = "\n".join(_code_cells(NOTEBOOK_05))
    stated = re.search(r"measured: (\d+\.\d) on ShanghaiTech's (IMG_\d+)", code)
    assert stated, "the check cell states its measurement"
    records = evaluate.select_records("B", "test", real_data_root, 12)
    record = max(records, key=lambda r: len(data.read_points(r.points_path)))
    assert record.name == stated.group(2)
    example = data.load_example(record)
    gt = density.density_map(example.points, example.image.shape[:2])
    gap = metrics.game(gt, example.points, 3, image_shape=gt.shape, truth_kind="points")
    assert f"{gap:.1f}" == stated.group(1)
    assert metrics.game(gt, gt, 3, truth_kind="density") == 0.0


def test_points_figure_draws_greedy_and_one_to_one_matchings():
    """Notebook 05's toy figure: the matching method changes the matches drawn and the scores."""
    from helpers.viz import evaluation as viz_evaluation

    canvas = np.full((10, 25, 3), 235, dtype=np.uint8)
    true_pts = np.array([[5.0, 5.0], [15.0, 5.0]])
    pred_pts = np.array([[11.0, 5.0], [20.0, 5.0]])
    for method, tp, f1 in (("greedy", 1, "0.50"), ("hungarian", 2, "1.00")):
        fig = viz_evaluation.points_figure(canvas, pred_pts, true_pts, radius=6.0, method=method, pairs=True)
        ax = fig.axes[0]
        assert len(ax.lines) == tp, method  # one line per matched pair
        assert f"F1 {f1}" in ax.get_title(), ax.get_title()
        plain = viz_evaluation.points_figure(canvas, pred_pts, true_pts, radius=6.0, method=method)
        assert len(plain.axes[0].lines) == 0 and f"F1 {f1}" in plain.axes[0].get_title()


# --------------------------------------------------------------------------- issue 13: one path, widgets 7 and 8


def _code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", [NOTEBOOK_05, NOTEBOOK_06], ids=["05", "06"])
def test_notebook_opens_with_the_settings_cell(path):
    """The first cell after the Colab cell a student edits: QUICK, PART, use_settings, the plan."""
    code = _code_cells(path)
    settings = code[1]
    number = path.name[:2]
    assert re.search(r"^QUICK = True\b", settings, re.M) and re.search(r'^PART = "B"', settings, re.M)
    assert "QUICK = config.use_settings(quick=QUICK)" in settings
    assert f'report.plan_markdown("{number}")' in settings
    rest = "\n".join(code[2:])
    assert "config.quick_mode()" not in rest and not re.search(r"^(QUICK|PART) = ", rest, re.M)


def test_notebook_05_evaluates_every_run_of_every_part():
    """Issue 13 §1: 05 scores every trained run of every part (one table per part), says when a
    model is borrowed, checks that the two models of 03 and 04 are in Part B's table, and browses
    the test predictions sorted by error."""
    code = "\n".join(_code_cells(NOTEBOOK_05))
    for call in ("evaluate.choose_runs(source, all_runs=ALL_RUNS)", "evaluate.evaluate_runs(chosen",
                 "evaluate.part_tables(", "report.fallback_banner(part_runs, part)",
                 "viz_browser.PredictionBrowser(", "evaluate.CheckpointPredictor(best_run.path)"):
        assert call in code, call
    assert '{"heatmap_cnn", "csrnet"} <= own_models' in code  # the check cell of the two-model table
    assert "evaluate.evaluate_checkpoint(" not in code and "runs.ensure_checkpoint(" not in code
    assert "checksum" in _markdown(NOTEBOOK_05)


def test_notebook_06_chooses_a_real_model_and_uploads_on_both_widget_versions():
    """Issue 13 §2, §3, §8: models_to_show, a banner for a borrowed model, uploads through
    save_upload / clear_upload (never assigning a FileUpload's value, read-only on ipywidgets 7),
    Colab's own upload behind a setting called from a cell, and path boxes through user_path."""
    cells = _code_cells(NOTEBOOK_06)
    code = "\n".join(cells)
    assert "runs.models_to_show(PART, source)" in code and "report.fallback_banner([chosen_run], PART)" in code
    assert "runs.save_upload(upload)" in code and "runs.clear_upload(upload)" in code
    assert not re.search(r"upload\.value\s*=[^=]", code)
    assert re.search(r"^COLAB_UPLOAD = False\b", code, re.M)
    colab = [c for c in cells if "runs.colab_upload()" in c]
    assert len(colab) == 1 and "def " not in colab[0] and "on_click" not in colab[0]
    assert colab[0].startswith("if COLAB_UPLOAD and runs.in_colab():")
    assert code.count("config.user_path(") == 2  # the checkpoint box and the image box
    assert ".value.strip()" not in code and "Path(typed)" not in code
    assert "checksum" in _markdown(NOTEBOOK_06)
