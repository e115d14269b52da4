"""Finding runs, describing them, ensuring a checkpoint exists, and the own-image helpers.

Fake runs are written exactly as helpers.train writes them (save_checkpoint, config.json from
TrainConfig.to_dict, history.csv from history_csv) around a tiny HeatmapCNN (width 8); the one
real training run uses a tiny dataset of 96 x 128 images in the ShanghaiTech layout.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.data import DataSource
from helpers.errors import CheckpointError, CrowdError
from helpers.metrics import find_peaks
from helpers.models import build_model
from helpers.predict import count
from helpers.tools import cli, recipes, runs
from helpers.tools import trainer as train_mod
from helpers.tools.checkpoints import load_model, save_checkpoint
from helpers.tools.fileio import write_json_atomic, write_text_atomic
from helpers.tools.synth import MANIFEST_NAME, write_points_mat
from helpers.tools.trainer import TrainConfig, history_csv

HEADS_PER_IMAGE = 7  # every image of the tiny set has this many heads: the val mean is 7 exactly


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """12 noisy 96 x 128 JPEGs with 7 dark 'heads' each, ShanghaiTech layout, part B train."""
    root = tmp_path_factory.mktemp("tiny_shtech")
    rng = np.random.default_rng(1)
    images = root / "part_B" / "train_data" / "images"
    gts = root / "part_B" / "train_data" / "ground-truth"
    images.mkdir(parents=True)
    gts.mkdir(parents=True)
    h, w = 96, 128
    for i in range(1, 13):
        pts = np.column_stack([rng.uniform(4, w - 4, HEADS_PER_IMAGE), rng.uniform(4, h - 4, HEADS_PER_IMAGE)])
        img = (rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
        for x, y in pts:
            img[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3] = 20
        Image.fromarray(img).save(images / f"IMG_{i}.jpg", quality=90)
        write_points_mat(gts / f"GT_IMG_{i}.mat", pts)
    return root


@pytest.fixture()
def home(tmp_path, monkeypatch, tiny_root) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CROWD_HOME", str(home))
    monkeypatch.setenv("CROWD_CACHE", str(tmp_path.parent / "runs_test_cache"))
    monkeypatch.setenv("CROWD_DATA", str(tiny_root))
    for key in ("CROWD_QUICK", "CROWD_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    return home


def _synthetic_root(tmp_path: Path) -> Path:
    root = tmp_path / "synthetic_set"
    root.mkdir()
    (root / MANIFEST_NAME).write_text(json.dumps({"version": 1}), encoding="utf-8")
    return root


def fake_run(folder: Path, maes: list[float], *, data_root: str | None, resize: float = 0.5,
             max_fit: int | None = None, model_kwargs: dict | None = None,
             ckpt_data_root: str | None = None, part: str = "B") -> Path:
    """A run folder as helpers.train leaves it: config.json, history.csv, best.pt."""
    folder.mkdir(parents=True)
    cfg = TrainConfig(model="heatmap_cnn", model_kwargs=model_kwargs or {"width": 8}, part=part,
                      resize=resize, max_fit=max_fit, data_root=data_root, out=str(folder),
                      epochs=len(maes))
    history = [{"epoch": i + 1, "step": 3 * (i + 1), "train_loss": 1.0 / (i + 1), "val_mae": m,
                "val_rmse": 1.5 * m, "lr": 1e-3, "seconds": 0.5} for i, m in enumerate(maes)]
    best = int(np.argmin(maes))
    model = build_model("heatmap_cnn", **cfg.model_kwargs)
    save_checkpoint(folder / "best.pt", {
        "format": 1, "model": model.state_dict(), "model_name": "heatmap_cnn",
        "model_kwargs": dict(cfg.model_kwargs), "scale": 100.0, "stride": 8, "epoch": best + 1,
        "step": 3 * (best + 1), "val_mae": maes[best], "val_rmse": 1.5 * maes[best],
        "best_val_mae": maes[best], "config": cfg.to_dict(),
        "data_root": ckpt_data_root if ckpt_data_root is not None else data_root,
    })
    write_json_atomic(folder / "config.json", cfg.to_dict())
    write_text_atomic(folder / "history.csv", history_csv(history))
    return folder / "best.pt"


# --------------------------------------------------------------------------- find_runs


def test_find_runs_reads_and_sorts(tmp_path, tiny_root):
    synth = _synthetic_root(tmp_path)
    root = tmp_path / "runs"
    fake_run(root / "worse", [9.0, 6.5, 7.0], data_root=str(tiny_root), resize=0.5)
    fake_run(root / "better", [8.0, 4.25], data_root=None, ckpt_data_root=str(synth),
             resize=1.0, max_fit=16)
    fake_run(root / "group" / "nested", [5.0], data_root=str(tmp_path / "gone"))
    (root / "no_best").mkdir()  # a run that never validated: no best.pt, not listed
    found = runs.find_runs(root)
    assert [r.name for r in found] == ["better", "group/nested", "worse"]
    better, nested, worse = found
    # scores and epochs: the history's minimum and row count
    assert better.best_val_mae == 4.25 and better.best_epoch == 2 and better.epochs == 2
    assert worse.best_val_mae == 6.5 and worse.best_epoch == 2 and worse.epochs == 3
    # data: a SYNTHETIC.json folder (recorded only in the checkpoint), a real folder, a gone one
    assert better.data == runs.SYNTHETIC and better.data_root == str(synth)
    assert worse.data == runs.SHANGHAITECH and nested.data == runs.UNKNOWN
    assert worse.input_scale == 0.5 and better.input_scale == 1.0
    assert better.model == "heatmap_cnn" and better.part == "B"
    assert better.demo and not worse.demo and better.max_fit == 16
    assert all(r.ok for r in found) and better.path == root / "better" / "best.pt"
    assert "val MAE 4.2" in better.label and "synthetic" in better.label
    table = runs.runs_markdown(found).splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| `better` | HeatmapCNN | B | synthetic | 2 |")
    assert table[2].endswith(f"| <= 16 | 1 | {4.25:.1f} |")


def test_checkpoint_newer_than_history_and_broken_files(tmp_path, tiny_root):
    root = tmp_path / "runs"
    best = fake_run(root / "timed", [10.0], data_root=str(tiny_root))
    # a run stopped by its time budget: best.pt rewritten after the history with a better score
    ckpt = torch.load(best, weights_only=True)
    ckpt["best_val_mae"], ckpt["epoch"] = 3.5, 2
    save_checkpoint(best, ckpt)
    later = time.time() + 10
    os.utime(best, (later, later))
    bad = root / "broken" / "best.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    found = runs.find_runs(root)
    assert [r.name for r in found] == ["timed", "broken"]
    assert found[0].best_val_mae == 3.5 and found[0].best_epoch == 2 and found[0].epochs == 2
    assert not found[1].ok and "broken" in found[1].error
    assert runs.best_run(found) is found[0]
    with pytest.raises(CheckpointError, match="does not exist"):
        runs.run_info(tmp_path / "nowhere" / "best.pt")
    assert runs.find_runs(tmp_path / "missing_folder") == []


def test_best_run_filters_by_data_model_and_part(tmp_path, tiny_root):
    synth = _synthetic_root(tmp_path)
    root = tmp_path / "runs"
    fake_run(root / "real_B", [6.0], data_root=str(tiny_root))
    fake_run(root / "real_A", [2.0], data_root=str(tiny_root), part="A")
    fake_run(root / "synth_B", [1.0], data_root=str(synth))
    found = runs.find_runs(root)
    real = DataSource(tiny_root, synthetic=False, origin="argument")
    fake = DataSource(synth, synthetic=True, origin="synthetic")
    assert runs.best_run(found).name == "synth_B"
    assert runs.best_run(found, real).name == "real_A"
    assert runs.best_run(found, real, part="B").name == "real_B"
    assert runs.best_run(found, fake, part="B").name == "synth_B"
    assert runs.best_run(found, fake, part="A") is None
    assert runs.best_run(found, real, model="csrnet") is None


def test_describe_run_states_model_data_and_accuracy(tmp_path, tiny_root):
    synth = _synthetic_root(tmp_path)
    root = tmp_path / "runs"
    fake_run(root / "full", [12.0, 9.0], data_root=str(tiny_root))
    fake_run(root / "demo", [3.0], data_root=str(synth), max_fit=16)
    demo, full = sorted(runs.find_runs(root), key=lambda r: r.name)
    # the validation mean count is read from the data: every tiny image has 7 heads
    mean, n = runs.validation_mean_count(full)
    assert mean == HEADS_PER_IMAGE and n >= 1
    text = runs.describe_run(full)
    assert "`full`" in text and "HeatmapCNN" in text and "ShanghaiTech" in text and "part B" in text
    assert "street scenes" in text
    assert "9.0 people per image" in text and f"{100 * 9.0 / 7:.0f} %" in text
    assert "2 epochs" in text and "resized by 0.5" in text and "demo" not in text
    text = runs.describe_run(demo, mean_count=20.0)
    assert "3.0 people per image" in text and "15 %" in text  # 3 / 20
    assert "quick demo model" in text and "synthetic crowds" in text and "street scenes" not in text
    html_text = runs.describe_run(demo, mean_count=20.0, html=True)
    assert "<b>Validation MAE: 3.0 people per image</b>" in html_text and "**" not in html_text


# --------------------------------------------------------------------------- ensure_checkpoint


def _no_training(*args, **kwargs):
    raise AssertionError("train() must not be called when a checkpoint exists")


def test_ensure_checkpoint_returns_existing_run(home, tiny_root, monkeypatch):
    monkeypatch.setattr(train_mod, "train", _no_training)
    root = home / "runs"
    fake_run(root / "heatmap_cnn_B", [5.0], data_root=str(tiny_root))
    fake_run(root / "heatmap_cnn_B_second", [7.0], data_root=str(tiny_root))
    assert runs.ensure_checkpoint("heatmap_cnn", "B") == root / "heatmap_cnn_B" / "best.pt"
    # a run trained on the other kind of data is not used: it would have to train
    fake = DataSource(_synthetic_root(home), synthetic=True, origin="synthetic")
    with pytest.raises(AssertionError, match="must not be called"):
        runs.ensure_checkpoint("heatmap_cnn", "B", source=fake)


def test_ensure_checkpoint_trains_a_demo_when_missing(home, tiny_root, monkeypatch):
    calls = []
    original = recipes.recommended_config

    def tiny_recipe(model, part, out, *, quick=None, **overrides):
        calls.append({"quick": quick, **overrides})
        cfg = original(model, part, out, quick=quick, **overrides)
        cfg.model_kwargs, cfg.epochs, cfg.crop, cfg.batch_size = {"width": 8}, 2, 64, 4
        cfg.device, cfg.workers, cfg.cache_in_memory = "cpu", 0, False
        return cfg

    monkeypatch.setattr(recipes, "recommended_config", tiny_recipe)
    path = runs.ensure_checkpoint("heatmap_cnn", "B")
    folder = home / "runs" / "heatmap_cnn_B_demo"
    assert path == folder / "best.pt" and path.is_file()
    assert calls == [{"quick": True, "data_root": str(tiny_root), "resume": False}]
    model, info = load_model(path, "cpu", expect_model="heatmap_cnn")
    assert info.config["max_fit"] == recipes.QUICK["heatmap_cnn"]["max_fit"]
    run = runs.run_info(path)
    assert run.data == runs.SHANGHAITECH and run.demo and run.best_val_mae is not None
    # asked again: the demo run is found, nothing is trained
    monkeypatch.setattr(train_mod, "train", _no_training)
    assert runs.ensure_checkpoint("heatmap_cnn", "B") == path


def test_ensure_checkpoint_refuses_a_foreign_run_folder(home, tiny_root, monkeypatch):
    monkeypatch.setattr(train_mod, "train", _no_training)
    out = home / "elsewhere"
    best = fake_run(out, [5.0], data_root=str(tiny_root), part="A")
    best.rename(out / "last.pt")  # an unfinished part A run
    with pytest.raises(CrowdError, match="already holds a run of heatmap_cnn on part A"):
        runs.ensure_checkpoint("heatmap_cnn", "B", out=out)


# --------------------------------------------------------------------------- own images


def test_heads_at_threshold_matches_count(tmp_path):
    torch.manual_seed(0)
    model = build_model("heatmap_cnn", width=8).eval()
    model.input_scale = 0.5  # as a checkpoint trained at half resolution
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (203, 301, 3), dtype=np.uint8)  # odd size: border cells
    pred = count(image, model, scale=1.0, device="cpu")
    assert pred.model_shape == (102, 150) and pred.image_shape == (203, 301)
    lowres = pred.density_lowres
    for t in np.quantile(lowres, [0.2, 0.6, 0.95]):
        again = count(image, model, scale=1.0, device="cpu", threshold=float(t))
        assert np.array_equal(runs.heads_at_threshold(pred, float(t)), again.points)
    thresholds = np.concatenate([np.linspace(0, float(lowres.max()), 7), runs.threshold_grid(pred, 9)])
    n = runs.peak_counts(pred, thresholds)
    assert n.tolist() == [len(find_peaks(lowres, float(t))) for t in thresholds]
    grid = runs.threshold_grid(pred, 9)
    ng = runs.peak_counts(pred, grid)
    assert grid[0] == 0 and (np.diff(grid) > 0).all() and len(grid) <= 9
    assert (np.diff(ng) <= 0).all() and ng[-1] == 0 and ng[0] == len(find_peaks(lowres, 0.0)) > 0
    # the default threshold gives the number of heads nearest the rounded count: brute force over
    # a fine grid and every peak value
    k = round(pred.count)
    chosen = runs.threshold_for_count(pred)
    brute = np.concatenate([np.linspace(0, float(lowres.max()), 2001), runs.peak_values(pred)])
    best_gap = min(abs(len(find_peaks(lowres, float(t))) - k) for t in brute)
    assert abs(len(find_peaks(lowres, chosen)) - k) == best_gap
    # with a grid: the lowest grid value among the nearest
    gaps = np.abs(ng - k)
    assert runs.threshold_for_count(pred, grid) == grid[int(np.flatnonzero(gaps == gaps.min())[0])]


def test_save_upload(tmp_path):
    payload = b"\x89PNG fake bytes \x00\x01"
    value = ({"name": "../my photo (1).png", "type": "image/png", "size": len(payload),
              "content": memoryview(payload)},)
    path = runs.save_upload(value, tmp_path)
    assert path == tmp_path / "my_photo_1_.png" and path.read_bytes() == payload
    old_style = {"crowd.jpg": {"content": payload}}  # ipywidgets 7
    assert runs.save_upload(old_style, tmp_path).name == "crowd.jpg"
    assert runs.save_upload((), tmp_path) is None and runs.save_upload({}, tmp_path) is None


def test_cli_lists_runs(home, tmp_path, tiny_root, capsys):
    root = tmp_path / "runs"
    fake_run(root / "b", [4.0], data_root=str(tiny_root))
    fake_run(root / "a", [6.0], data_root=str(tiny_root))
    assert cli.main(["runs", "--root", str(root), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["name"] for d in lines] == ["b", "a"] and lines[0]["best_val_mae"] == 4.0
    assert cli.main(["runs", "ensure", "--root", str(root), "--part", "Z"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
