"""One path through the notebooks (issue 13 §1): the settings cell, run folder names that carry
the mode and the data, 05 evaluating every trained run of every part, borrowed models marked."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_shtech

from helpers import config
from helpers.data import DataSource
from helpers.errors import CrowdError
from helpers.tools import evaluate, recipes, report, runs
from helpers.tools.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the settings cell


def test_use_settings_sets_quick_mode_unless_the_environment_chose(monkeypatch, capsys):
    monkeypatch.delenv("CROWD_QUICK", raising=False)
    monkeypatch.setattr(config, "_QUICK_SET_HERE", [])
    assert config.use_settings(quick=True) is True and config.quick_mode()
    assert "quick mode ON" in capsys.readouterr().out
    # the student edits the cell to QUICK = False and runs it again in the same kernel
    assert config.use_settings(quick=False) is False and not config.quick_mode()
    assert "QUICK = False in this notebook" in capsys.readouterr().out
    assert config.use_settings(quick=True) is True

    # `make run CROWD_QUICK=0` or CI: the environment wins, and the cell says so
    monkeypatch.setattr(config, "_QUICK_SET_HERE", [])
    monkeypatch.setenv("CROWD_QUICK", "0")
    assert config.use_settings(quick=True) is False
    out = capsys.readouterr().out
    assert "quick mode OFF" in out and "CROWD_QUICK=0 set outside the notebook" in out
    monkeypatch.setenv("CROWD_QUICK", "1")
    assert config.use_settings(quick=False) is True
    assert config.use_settings(quick=False) is True  # still the environment's, however often it runs


def test_plan_tables_come_from_one_structure_and_the_readme_shows_it():
    assert set(report.PLAN) == set(report.NOTEBOOKS)  # every notebook of the series has its plan
    for number, plan in report.PLAN.items():
        text = report.plan_markdown(number)
        assert plan.needs in text and plan.writes in text
        for column in report.TIMING_COLUMNS:  # every time, and the GPU ones marked as estimates
            assert str(plan.times[column]) in text
            assert plan.times[column].measured or str(plan.times[column]).endswith("(estimate)")
        assert report.plan_markdown(plan.file) == text  # by number or by file name
    with pytest.raises(CrowdError, match="No notebook"):
        report.plan_markdown("09")
    # the README's table is the same structure, so README and notebooks cannot disagree
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert report.plan_table_markdown() in readme
    # CPU times are the README's measured ones: 03 full mode took about 25 min
    assert str(report.PLAN["03"].times[("CPU", "full")]) == "about 25 min"
    assert not report.PLAN["05"].times[("CPU", "full")].measured  # the README calls it an estimate


# --------------------------------------------------------------------------- run folders


def _source(synthetic: bool) -> DataSource:
    return DataSource(Path("/data"), synthetic=synthetic, origin="test")


def test_run_names_carry_mode_and_data(tmp_path, monkeypatch):
    real, fake = _source(False), _source(True)
    assert recipes.run_name("heatmap_cnn", "B", real, quick=False) == "heatmap_cnn_B"
    assert recipes.run_name("HeatmapCNN".replace("CNN", "_cnn"), "part_b", real, quick=True) == "heatmap_cnn_B_quick"
    assert recipes.run_name("csrnet", "A", fake, quick=True) == "csrnet_A_synthetic_quick"
    assert recipes.run_name("csrnet", "B", fake, quick=False, tag="compare_random") == "csrnet_B_compare_random_synthetic"
    names = {recipes.run_name(m, p, s, quick=q) for m in ("heatmap_cnn", "csrnet") for p in "AB"
             for s in (real, fake) for q in (True, False)}
    assert len(names) == 16  # every combination has its own folder
    monkeypatch.setenv("CROWD_HOME", str(tmp_path))
    monkeypatch.setenv("CROWD_QUICK", "1")  # default: the mode in force
    assert recipes.run_folder("heatmap_cnn", "B", real) == tmp_path / "runs" / "heatmap_cnn_B_quick"
    assert recipes.run_folder("heatmap_cnn", "B", real, root=tmp_path / "x") == tmp_path / "x" / "heatmap_cnn_B_quick"
    with pytest.raises(CrowdError, match="part must be A or B"):
        recipes.run_name("heatmap_cnn", "C", real)


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory) -> Path:
    """Both parts, train (6 images: fit 5, val 1) and test (3 images), 96 x 128 pixels."""
    root = tmp_path_factory.mktemp("two_parts")
    for seed, (part, split, n) in enumerate([("A", "train", 6), ("A", "test", 3), ("B", "train", 6), ("B", "test", 3)]):
        write_tiny_shtech(root, n, seed, part, split)
    return root


@pytest.fixture()
def project(two_parts, tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("CROWD_HOME", str(home))
    monkeypatch.setenv("CROWD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CROWD_DATA", str(two_parts))
    monkeypatch.setenv("CROWD_QUICK", "1")
    monkeypatch.delenv("CROWD_DEVICE", raising=False)
    return home


TINY = {"epochs": 1, "max_fit": 3, "max_val": 1, "crop": 64, "batch_size": 2, "resize": 1.0,
        "workers": 0, "cache_in_memory": False, "device": "cpu", "checkpoint_every": 0}


def _quick_run(model: str, part: str, **extra):
    """The notebook path in quick mode: the recipe, in the folder named by run_folder, shrunk."""
    source = DataSource(Path(config.env_data_root()), synthetic=False, origin="CROWD_DATA")
    kwargs = {"model_kwargs": {"pretrained": False}} if model == "csrnet" else {"model_kwargs": {"width": 8}}
    cfg = recipes.recommended_config(model, part, recipes.run_folder(model, part, source), resume=True,
                                     **{**TINY, **kwargs, **extra})
    return train(cfg)


def test_switching_mode_uses_another_folder_and_never_refuses_to_resume(project, monkeypatch):
    quick = _quick_run("heatmap_cnn", "B")
    assert quick.out == project / "runs" / "heatmap_cnn_B_quick"
    monkeypatch.setenv("CROWD_QUICK", "0")  # the student sets QUICK = False and runs the cell again
    full = _quick_run("heatmap_cnn", "B", epochs=2, max_fit=4)  # other settings, like the full recipe
    assert full.out == project / "runs" / "heatmap_cnn_B" and (full.out / "best.pt").is_file()
    # the same folder with other settings is what the names avoid: the trainer refuses it
    monkeypatch.setenv("CROWD_QUICK", "1")
    with pytest.raises(CrowdError):
        _quick_run("heatmap_cnn", "B", epochs=3, max_fit=5, lr=5e-4)


# --------------------------------------------------------------------------- 05: every run of every part


def test_evaluation_finds_both_models_and_every_part(project):
    _quick_run("heatmap_cnn", "B")
    _quick_run("csrnet", "B")
    _quick_run("heatmap_cnn", "A")
    source = DataSource(Path(config.env_data_root()), synthetic=False, origin="CROWD_DATA")
    chosen = evaluate.choose_runs(source)
    assert set(chosen) == {"A", "B"}
    own = {p: {(r.model, r.name) for r in rs if not r.shipped} for p, rs in chosen.items()}
    assert own["B"] == {("heatmap_cnn", "heatmap_cnn_B_quick"), ("csrnet", "csrnet_B_quick")}
    assert own["A"] == {("heatmap_cnn", "heatmap_cnn_A_quick")}
    assert all(r.shipped for rs in chosen.values() for r in rs if r.name not in {n for o in own.values() for _, n in o})

    per_part = evaluate.evaluate_runs(chosen, "test", progress=False)
    assert set(per_part) == {"A", "B"}
    b = per_part["B"]
    assert {"HeatmapCNN (heatmap_cnn_B_quick)", "CSRNet (csrnet_B_quick)"} <= set(b)
    for result in b.values():  # each scored on its own part: the 3 test images of part B
        assert result.summary["part"] == "B" and result.summary["images"] == 3
        truth = sorted(r["true_count"] for r in result.rows)
        assert truth == sorted(len(p) for p in _test_points(config.env_data_root(), "B"))
    assert per_part["A"]["HeatmapCNN (heatmap_cnn_A_quick)"].summary["part"] == "A"
    tables = evaluate.part_tables(per_part)
    assert tables.index("### Part A") < tables.index("### Part B")
    part_b = tables[tables.index("### Part B"):]
    assert "| HeatmapCNN (heatmap_cnn_B_quick) |" in part_b and "| CSRNet (csrnet_B_quick) |" in part_b
    assert part_b.count("your quick smoke run") >= 2 and "| Trained |" in part_b
    # the students' own runs need no banner
    assert report.fallback_banner([r for r in chosen["B"] if not r.shipped], "B") == ""


def _test_points(root: Path, part: str) -> list[np.ndarray]:
    from helpers.data import list_records, read_points

    return [read_points(r.points_path) for r in list_records(part, "test", root)]


def test_borrowed_models_get_a_banner_and_marked_rows(tmp_path):
    base = dict(path=tmp_path / "best.pt", model="heatmap_cnn", part="B", data=runs.SHANGHAITECH,
                data_root=None, best_val_mae=10.0, best_epoch=3, epochs=3)
    shipped = runs.RunInfo(name="shipped/heatmap_cnn_B", shipped=True, **base)
    demo = runs.RunInfo(name="heatmap_cnn_B_demo", max_fit=16, **base)
    smoke = runs.RunInfo(name="heatmap_cnn_B_quick", max_fit=16, **base)
    full = runs.RunInfo(name="heatmap_cnn_B", **base)
    assert [evaluate.run_origin(r) for r in (shipped, demo, smoke, full)] == ["shipped", "demo", "quick", "own"]
    banner = report.fallback_banner([smoke, shipped], "B")
    assert banner.startswith("> **⚠ NOT YOUR MODEL FOR PART B.**")
    assert "`shipped/heatmap_cnn_B`" in banner and "`heatmap_cnn_B_quick`" not in banner
    assert "notebook 03" in banner
    assert "heatmap_cnn_B_demo" in report.fallback_banner([demo])
    assert report.fallback_banner([smoke, full]) == ""
    summaries = {label: {"images": 3, "mae": 1.0, "rmse": 2.0, "origin": evaluate.run_origin(r)}
                 for label, r in (("a", shipped), ("b", demo), ("c", smoke), ("d", full))}
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip()
            for line in evaluate.results_table(summaries).splitlines()[2:]}
    assert rows == {"a": "**shipped with the project, not yours**",
                    "b": "**demo model trained automatically, not yours**",
                    "c": "your quick smoke run", "d": "your run"}
    # without origins there is no Trained column (10 columns)
    plain = evaluate.results_table({"m": {"images": 3, "mae": 1.0}})
    assert "Trained" not in plain and len(re.findall(r"\|", plain.splitlines()[0])) == 11
