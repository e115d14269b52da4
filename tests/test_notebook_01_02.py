"""Software checks moved out of notebooks 01 and 02, and checks of the code those notebooks teach.

The notebooks keep the checks that teach (counts, kernels, sums); what only tests software lives
here: the dataset browser and the density widget render what they should, the density cache is
reused when fresh and read back bit for bit, and the notebooks' own from-scratch code (the naive
density map of notebook 02) equals the library on cases with heads at the border. Also: the
settings cell of both notebooks, and the numbers their text states (with the real data).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import data, density

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NB01 = NOTEBOOKS / "01_dataset_exploration.ipynb"
NB02 = NOTEBOOKS / "02_ground_truth.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def cell_index(path: Path, needle: str, kind: str) -> int:
    """Index of the first cell of ``kind`` whose source contains ``needle``."""
    for i, c in enumerate(cells(path)):
        if c["cell_type"] == kind and needle in "".join(c["source"]):
            return i
    raise AssertionError(f"{path.name}: no {kind} cell contains {needle!r}")


def code_text(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in cells(path) if c["cell_type"] == "code")


def notebook_function(path: Path, name: str):
    """The function ``name`` as defined in a code cell of the notebook (the cell runs on its own)."""
    source = "".join(cells(path)[cell_index(path, f"def {name}(", "code")]["source"])
    namespace = {"np": np}
    exec(compile(source, f"{path.name}:{name}", "exec"), namespace)  # noqa: S102 - our own notebook
    return namespace[name]


# --------------------------------------------------------------------------- the settings cell of both


@pytest.mark.parametrize(("path", "number"), [(NB01, "01"), (NB02, "02")])
def test_settings_cell_comes_right_after_the_colab_cell(path, number):
    nb = cells(path)
    colab = (NOTEBOOKS / "colab_cell.py").read_text(encoding="utf-8")
    assert "".join(nb[1]["source"]).strip() == colab.strip(), "the first code cell is notebooks/colab_cell.py"
    assert nb[2]["cell_type"] == "markdown" and "## Settings" in "".join(nb[2]["source"])
    assert nb[3]["cell_type"] == "code"
    settings = "".join(nb[3]["source"])
    for line in ("QUICK = True", 'PART = "B"', "QUICK = config.use_settings(quick=QUICK)",
                 f'display(Markdown(report.plan_markdown("{number}")))'):
        assert line in settings, line
    # the settings cell is the one place the mode is chosen
    assert "config.quick_mode()" not in code_text(path)
    assert all(c.get("outputs", []) == [] for c in nb if c["cell_type"] == "code"), "outputs not stripped"


@pytest.mark.parametrize(("path", "number"), [(NB01, "01"), (NB02, "02")])
def test_settings_cell_sets_quick_mode_and_shows_the_plan(path, number, monkeypatch, capsys):
    """Run the settings cell: QUICK sets CROWD_QUICK (when the environment does not) and the plan of
    this notebook, with its measured CPU times, is displayed."""
    import IPython.display

    from helpers import config
    from helpers.tools import report

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    monkeypatch.setenv("CROWD_QUICK", "1")  # recorded, so the value the cell sets is undone afterwards
    monkeypatch.delenv("CROWD_QUICK")
    monkeypatch.setattr(config, "_QUICK_SET_HERE", [])
    source = "".join(cells(path)[3]["source"])
    for quick in (True, False):
        namespace = {}
        exec(compile(source.replace("QUICK = True", f"QUICK = {quick}", 1), path.name, "exec"), namespace)  # noqa: S102
        assert namespace["QUICK"] is quick and config.quick_mode() is quick
        assert namespace["PART"] == "B"
        assert shown[-1].data == report.plan_markdown(number)
        assert f"quick mode {'ON' if quick else 'OFF'}" in capsys.readouterr().out


def seconds(text: str) -> float:
    """'about 20 s' -> 20.0, 'about 2 min' -> 120.0 (the plan's wording)."""
    match = re.search(r"(\d+(?:\.\d+)?)\s*(s|min)\b", text)
    assert match, text
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_notebook_01_text_and_plan_agree_on_its_running_time():
    """The introduction of 01 says it runs in under a minute in quick and full mode alike."""
    from helpers.tools import report

    intro = "".join(cells(NB01)[0]["source"])
    assert "under a minute in quick mode and in full mode alike" in intro
    times = report.PLAN["01"].times
    assert seconds(str(times[("CPU", "quick")])) < 60 and seconds(str(times[("CPU", "full")])) < 60


# --------------------------------------------------------------------------- notebook 01


def test_browser_draws_a_png_with_the_title(tiny_shtech):
    """Notebook 01's dataset browser: one image drawn to PNG bytes, titled, points on or off."""
    from helpers.viz import dataset as viz_dataset
    from helpers.viz import figure_png

    record = data.list_records("B", "train", root=tiny_shtech)[0]
    example = data.load_example(record)
    shown = viz_dataset.show_example(example, show_points=True, title=f"B/train {record.name}")
    title = shown.axes[0].get_title()
    assert title.startswith(f"B/train {record.name}: {example.count} heads"), title
    assert len(shown.axes[0].collections) == 1  # the head points
    assert figure_png(shown)[:8] == PNG_MAGIC
    hidden = viz_dataset.show_example(example, show_points=False, title="no points")
    assert len(hidden.axes[0].collections) == 0
    assert figure_png(hidden)[:8] == PNG_MAGIC


def test_nn_distance_caption_says_what_notebook_01_explains():
    """The saved figure's caption must not call the k-NN distance a head size everywhere."""
    from helpers.tools import report

    caption = report.FIGURES["01_nn_distance_vs_row"].caption
    assert "3 nearest heads" in caption and "Part B" in caption and "dense" in caption, caption
    assert "heads get smaller" not in caption


def test_notebook_01_reads_a_mat_file_by_hand():
    source = code_text(NB01)
    assert 'scipy.io.loadmat(record.points_path)' in source
    assert "np.array_equal(points, by_hand)" in source


def test_notebook_01_examples_follow_part():
    """PART chooses the examples opened by hand: the annotation file and the browser's first part."""
    source = code_text(NB01)
    assert 'record = data.list_records(PART, "train")[0]' in source
    assert "widgets.Dropdown(options=list(PARTS), value=PART" in source
    assert 'list_records("A"' not in source and 'list_records("B"' not in source


def test_notebook_01_perspective_numbers_are_the_measured_ones(real_data_root):
    """The numbers the text of section 4 states (ShanghaiTech, every train image, 10 row bins)."""
    from helpers.analysis import explore

    text = "\n".join("".join(c["source"]) for c in cells(NB01) if c["cell_type"] == "markdown")
    assert "(about 15 px)" in text and "(to about 40 px in the bottom bin)" in text
    assert "from about 20 px in the top bin to about 250 px in the bottom one" in text
    prof_a = explore.nn_distance_by_row(data.list_records("A", "train", root=real_data_root), bins=10)
    prof_b = explore.nn_distance_by_row(data.list_records("B", "train", root=real_data_root), bins=10)
    assert np.all(np.abs(prof_a.mean[:5] - 15) <= 1.5), prof_a.mean  # the upper half: about 15 px
    assert abs(prof_a.mean[-1] - 40) <= 4, prof_a.mean  # bottom bin: about 40 px
    assert abs(prof_b.mean[0] - 20) <= 3 and abs(prof_b.mean[-1] - 250) <= 15, prof_b.mean


# --------------------------------------------------------------------------- notebook 02


def test_notebook_02_exercise_comes_before_the_solution():
    exercise = cell_index(NB02, "### Exercise: write the density map yourself", "markdown")
    stub = cell_index(NB02, "def my_density_map(", "code")
    solution = cell_index(NB02, "def naive_density_map(", "code")
    assert exercise < stub < solution
    assert "return None" in "".join(cells(NB02)[stub]["source"]), "the exercise cell stays unsolved"


@pytest.mark.parametrize(
    ("points", "shape"),
    [
        ([[0.5, 0.5], [39.9, 12.0], [20.2, 29.7], [21.0, 27.0], [6.5, 17.3]], (30, 40)),  # the notebook's toy
        ([[0.0, 0.0], [0.0, 0.0], [15.99, 11.99], [8.0, 6.0]], (12, 16)),  # corners, a repeated click
        ([[3.3, 2.7]], (5, 7)),  # one head, kernel (fallback sigma 4 px) far larger than the image
    ],
)
def test_naive_density_map_of_notebook_02_equals_density_map(points, shape):
    naive_density_map = notebook_function(NB02, "naive_density_map")
    pts = np.array(points, dtype=np.float64)
    params = density.DensityParams()
    sigmas = density.adaptive_sigmas(pts, k=params.k, beta=params.beta, fallback_sigma=params.sigma)
    expected = density.density_map(pts, shape, params)
    got = naive_density_map(pts, sigmas, shape)
    assert got.dtype == np.float32 and got.shape == shape
    assert np.abs(got - expected).max() <= 1e-6 * expected.max()
    assert abs(got.sum(dtype=np.float64) - len(pts)) <= 1e-4 * len(pts)


def test_naive_density_map_without_renormalisation_would_differ():
    """The check above can fail: dropping the border renormalisation loses mass in a corner."""
    pts = np.array([[0.5, 0.5]])
    sigma = np.array([4.0])
    expected = density.density_map(pts, (20, 20), density.DensityParams("fixed", sigma=4.0))
    rows, cols = np.arange(20)[:, None], np.arange(20)[None, :]
    kernel = np.exp(-(rows**2 + cols**2) / (2 * sigma[0] ** 2))
    radius = int(4 * sigma[0] + 0.5)
    full = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma[0] ** 2)).sum() ** 2
    unrenormalised = (kernel * (np.maximum(rows, cols) <= radius) / full).astype(np.float32)
    assert np.abs(unrenormalised - expected).max() > 1e-2 * expected.max()


def test_notebook_02_border_loss_numbers_are_the_measured_ones(real_data_root):
    """Section 5 of 02: on 100 train images per part the original border handling loses, over the
    middle half of the images, 0.4 to 1.5 % of the heads in Part A, 2 to 6 % in Part B, and a fifth
    on one Part B image; renormalised maps and sum-pooling keep every count (1e-4 relative)."""
    from helpers.analysis import ground_truth

    text = "\n".join("".join(c["source"]) for c in cells(NB02) if c["cell_type"] == "markdown")
    assert "lose 0.4 to 1.5 %" in text and "2 to 6 % in Part B" in text and "loses a fifth" in text
    params = density.DensityParams()
    for part, (low, high) in {"A": (0.4, 1.5), "B": (2.0, 6.0)}.items():
        records = data.take_evenly(data.list_records(part, "train", root=real_data_root), 100)
        rows = ground_truth.count_table(records, params, factor=8, progress=False)
        lost = np.array([100 * (r["n_points"] - r["sum_no_renorm"]) / max(r["n_points"], 1) for r in rows])
        quartiles = np.quantile(lost, [0.25, 0.75])
        assert abs(quartiles[0] - low) <= 0.25 * low and abs(quartiles[1] - high) <= 0.25 * high, quartiles
        if part == "B":
            assert 17 <= lost.max() <= 23, lost.max()  # "a fifth"
        for r in rows:
            assert abs(r["sum_pooled"] - r["n_points"]) <= 1e-4 * max(r["n_points"], 1), r


def test_density_widget_title_counts_the_heads():
    """Notebook 02's slider view: the image panel is titled with the number of heads drawn."""
    from helpers.viz import density as viz_density

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    points = rng.uniform([0, 0], [80, 64], (7, 2))
    dmap = density.density_map(points, image.shape, density.DensityParams())
    fig = viz_density.density_panel(image, points, dmap, title="adaptive")
    assert fig.axes[0].get_title() == "7 heads"
    assert abs(dmap.sum(dtype=np.float64) - 7) <= 1e-4 * 7


def test_density_cache_is_reused_and_read_back_exactly(tiny_shtech, isolated_home):
    """Notebook 02's cache section: a second build finds every map fresh; a cached map is the map."""
    from helpers.tools import cache

    records = data.list_records("B", "train", root=tiny_shtech)[:4]
    params = density.DensityParams()
    first = cache.build_cache(records, params, progress=False)
    assert first["built"] == len(records) and first["skipped_fresh"] == 0, first
    again = cache.build_cache(records, params, progress=False)
    assert again["skipped_fresh"] == len(records) and again["built"] == again["rebuilt_stale"] == 0, again
    for record in records:
        assert cache.cache_status(record, params) == "fresh"
        cached = cache.load_density(record, params)
        example = data.load_example(record)
        computed = density.density_map(example.points, example.image.shape, params)
        assert cached.dtype == np.float32 and np.array_equal(cached, computed)
