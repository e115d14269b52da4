"""The report assembly (report.md, figure sheet) and the error-analysis numbers of notebook 05."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers.errors import CrowdError
from helpers.tools import cli, report
from helpers.tools.evaluate import KeptImage, summarize, write_results


def _pdf_pages(path: Path) -> int:
    """Pages of a PDF: page objects are "/Type /Page" (the page tree is "/Type /Pages")."""
    return len(re.findall(rb"/Type\s*/Page\b", path.read_bytes()))


def _png(path: Path, seed: int = 0) -> Path:
    import matplotlib.image as mpimg

    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(path, np.random.default_rng(seed).random((30, 40, 3)))
    return path


def _rows(true, pred):
    from helpers.tools.evaluate import bucket_of

    return [{"name": f"IMG_{i}", "true_count": int(t), "pred_count": float(p), "error": float(p - t),
             "abs_error": abs(float(p - t)), "bucket": bucket_of(t)}
            for i, (t, p) in enumerate(zip(true, pred, strict=True))]


# --------------------------------------------------------------------------- report assembly


@pytest.fixture()
def filled_home(isolated_home):
    """A project folder with three figures (two key ones, one unknown) and a results table."""
    figures = isolated_home / "report" / "figures"
    _png(figures / "05_count_scatter_B.png", 1)
    _png(figures / "01_annotated_grid.png", 2)
    _png(figures / "my_own_plot.png", 3)
    (figures / "05_count_scatter_B.pdf").write_bytes(b"%PDF-1.4 not a figure png")  # ignored
    rows = _rows([10, 40, 120], [12.0, 30.0, 100.0])
    summary = summarize(rows, name="HeatmapCNN (heatmap_cnn_B)")
    summary.update({"part": "B", "split": "test"})
    write_results({"HeatmapCNN (heatmap_cnn_B)": summary}, isolated_home / "report")
    return isolated_home


def test_report_embeds_present_figures_with_relative_paths(filled_home):
    result = report.build_report(date="2024-01-01")
    text = (filled_home / "report" / "report.md").read_text()
    assert result.report == filled_home / "report" / "report.md"
    # known figures embedded relative to report/, with their catalogue caption (+ part)
    assert "](figures/05_count_scatter_B.png)" in text
    assert "](figures/01_annotated_grid.png)" in text
    assert report.FIGURES["05_count_scatter"].caption.rstrip(".") + " (part B)." in text
    assert str(filled_home) not in text, "links must be relative, so the folder can be moved"
    # figure order: data (01) before results (05); the unknown figure listed at the end
    assert text.index("01_annotated_grid.png") < text.index("05_count_scatter_B.png")
    other = text.split("## Other figures", 1)[1]
    assert "[my_own_plot](figures/my_own_plot.png)" in other
    # the results table of results.md, without its heading, and facts from results.json
    assert "| HeatmapCNN (heatmap_cnn_B) | 3 |" in text
    assert "# Results" not in text
    mae = np.mean([2.0, 10.0, 20.0])
    assert f"MAE {mae:.1f}" in text and "part B, test split" in text
    # TODO headings for the student and what is missing, with the notebook that makes it
    assert text.count("**TODO (student):**") >= 6
    missing = text.split("## Still missing", 1)[1]
    assert "`03_history`" in missing and "03_heatmap_cnn.ipynb" in missing
    assert "results.md" not in missing
    assert any("03_history" in m for m in result.missing)


def test_figure_sheet_has_one_page_per_key_figure(filled_home):
    result = report.build_report()
    sheet = filled_home / "report" / "figures" / report.SHEET_NAME
    assert result.sheet == sheet and sheet.is_file()
    assert sheet.read_bytes().startswith(b"%PDF")
    key_present = [f for f in result.figures if f.spec.key]
    assert len(key_present) == 2  # 01_annotated_grid and 05_count_scatter_B; my_own_plot is unknown
    assert result.sheet_pages == 2 == _pdf_pages(sheet)
    # every figure, known or not, with all_figures; no temporary files left behind
    result = report.build_report(all_figures=True)
    assert result.sheet_pages == 3 == _pdf_pages(sheet)
    assert not [p for p in sheet.parent.iterdir() if p.name.endswith(".tmp")]


def test_report_without_figures_or_results(isolated_home):
    sheet = isolated_home / "report" / "figures" / report.SHEET_NAME
    _png(isolated_home / "report" / "figures" / "x.png")
    sheet.write_bytes(b"%PDF-1.4 stale")  # an old sheet must not survive with figures that are gone
    result = report.build_report()
    text = result.report.read_text()
    assert result.sheet is None and result.sheet_pages == 0 and not sheet.exists()
    assert "The results table is missing: run notebook 05_evaluation.ipynb" in text
    assert "results.md" in result.missing[0]
    for spec in report.FIGURES.values():
        if spec.key:
            assert f"`{spec.stem}`" in text.split("## Still missing", 1)[1], spec.stem


def test_command_line(filled_home, capsys):
    assert cli.main(["report"]) == 0
    out = capsys.readouterr().out
    assert "report.md (3 figures, results table: yes)" in out
    assert "figure_sheet.pdf (2 pages)" in out
    assert "missing: figure 03_history (03_heatmap_cnn.ipynb)" in out
    assert cli.main(["report", "--json", "--all-figures"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sheet_pages"] == 3 and data["unknown_figures"] == ["my_own_plot"]
    assert data["figures"] == ["01_annotated_grid", "05_count_scatter_B"]


def test_command_line_error(isolated_home, capsys):
    (isolated_home / "report").write_text("not a folder")
    with pytest.raises(CrowdError):
        report.build_report(isolated_home / "report")
    assert cli.main(["report"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_match_figure_takes_the_longest_known_stem():
    spec, variant = report.match_figure("06_heads_vs_threshold_IMG_316")
    assert spec.stem == "06_heads_vs_threshold" and variant == "IMG_316"
    spec, variant = report.match_figure("06_heads_IMG_316")
    assert spec.stem == "06_heads" and variant == "IMG_316"
    spec, variant = report.match_figure("03_receptive_field_on_image_B")
    assert spec.stem == "03_receptive_field_on_image" and variant == "B"
    spec, variant = report.match_figure("03_receptive_field")
    assert spec.stem == "03_receptive_field" and variant is None
    assert report.match_figure("05_count_scatterplot") == (None, None)
    for spec in report.FIGURES.values():
        assert spec.notebook in report.NOTEBOOKS.values(), spec.stem


# --------------------------------------------------------------------------- error analysis


def test_signed_errors_by_bucket_against_numpy():
    true = np.array([10, 20, 60, 80, 300, 0])
    pred = np.array([14.0, 18.0, 50.0, 70.0, 210.0, 3.0])
    rows = _rows(true, pred)
    table = {b["bucket"]: b for b in report.signed_errors_by_bucket(rows)}
    assert list(table) == ["0-49", "50-99", "250-499"]
    b = table["0-49"]  # 10, 20 and 0 people
    assert b["images"] == 3
    assert b["mean_error"] == pytest.approx(np.mean([4.0, -2.0, 3.0]))
    assert b["mae"] == pytest.approx(3.0)
    assert b["relative_error_pct"] == pytest.approx(100 * np.mean([4 / 10, -2 / 20]))  # empty image left out
    assert table["50-99"]["mean_error"] == pytest.approx(-10.0)
    assert table["250-499"]["relative_error_pct"] == pytest.approx(-30.0)
    assert table["250-499"]["mean_pred"] == 210.0


def test_extreme_images():
    rows = _rows([5, 500, 50, 400, 1], [6.0, 400.0, 50.0, 300.0, 3.0])
    dense = report.extreme_images(rows, 2)
    assert dense["names"] == ["IMG_1", "IMG_3"]
    assert dense["relative_error_pct"] == pytest.approx(100 * np.mean([-100 / 500, -100 / 400]))
    assert dense["mean_error"] == pytest.approx(-100.0)
    sparse = report.extreme_images(rows, 2, densest=False)
    assert sparse["names"] == ["IMG_4", "IMG_0"]
    assert sparse["relative_error_pct"] == pytest.approx(100 * np.mean([2 / 1, 1 / 5]))
    assert report.extreme_images(rows, 50)["images"] == 5


def test_band_counts_against_loops():
    rng = np.random.default_rng(0)
    h, w = 31, 20
    density = rng.random((h, w)).astype(np.float32)
    points = np.column_stack([rng.uniform(0, w, 200), rng.uniform(0, h, 200)])
    for bands in (1, 3, 4, 40):
        true, pred = report.band_counts(points, density, bands)
        edges = [b * h // bands for b in range(bands + 1)]
        for b in range(bands):
            assert pred[b] == pytest.approx(float(density[edges[b]:edges[b + 1]].sum(dtype=np.float64)))
            in_band = (np.floor(points[:, 1]) >= edges[b]) & (np.floor(points[:, 1]) < edges[b + 1])
            assert true[b] == in_band.sum()
        assert true.sum() == 200 and pred.sum() == pytest.approx(float(density.sum(dtype=np.float64)))


def test_band_counter_and_facts():
    image = np.zeros((30, 10, 3), dtype=np.uint8)
    density = np.zeros((30, 10), dtype=np.float32)
    density[25, 5] = 4.0  # the model sees 4 people at the bottom, none at the top
    pts = np.array([[1.0, 2.0], [2.0, 3.0], [5.0, 25.5], [6.0, 26.0]])  # 2 at the top, 2 at the bottom
    counter = report.BandCounter(3)
    row = {"name": "a", "true_count": 4, "pred_count": 4.0, "abs_error": 0.0}
    counter(KeptImage("a", image, pts, density, None, row))
    counter(KeptImage("b", image, pts, None, None, row))  # no map: skipped
    table = counter.table()
    assert counter.images == 1 and list(table) == ["top", "middle", "bottom"]
    assert table["top"] == {"true": 2.0, "predicted": 0.0, "error": -2.0, "found_pct": 0.0}
    assert table["middle"]["found_pct"] is None
    assert table["bottom"]["found_pct"] == pytest.approx(200.0)

    # a model that undercounts dense images and overcounts sparse ones
    true = np.array([5, 8, 100, 200, 400, 600])
    pred = np.array([9.0, 10.0, 90.0, 150.0, 300.0, 420.0])
    facts = report.error_facts(_rows(true, pred), "M", n=2, bands=counter)
    text = "\n".join(facts)
    dense = 100 * np.mean([(300 - 400) / 400, (420 - 600) / 600])
    sparse = 100 * np.mean([4 / 5, 2 / 8])
    assert f"On the 2 densest images (mean true count 500.0, mean prediction 360.0) M undercounts by {abs(dense):.0f} %" in text
    assert f"On the 2 sparsest images (mean true count 6.5, mean prediction 9.5) M overcounts by {sparse:.0f} %" in text
    bias = float(np.mean(pred - true))
    assert f"M undercounts by {abs(bias):.1f} people per image" in facts[0]
    slope = np.polyfit(true, pred - true, 1)[0]
    assert f"slope of {slope:+.2f}" in text and "falls further behind" in text
    assert "0 % of the people in the top band and 200 % of the people in the bottom band" in text
    assert report.error_facts([], "M") == ["M: no images were scored."]
