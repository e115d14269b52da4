"""Recipes (recommended settings) and the wall-clock budget of the training loop.

The budget test trains a tiny HeatmapCNN (width 8) on 64 x 64 crops of 12 synthetic 96 x 128
images, with a simulated clock so that the budget ends at a known step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from helpers.data import list_records
from helpers.errors import CrowdError
from helpers.samples import CrowdDataset
from helpers.tools.checkpoints import load_checkpoint, load_model
from helpers.tools.recipes import FULL, QUICK, epochs_for_budget, recommended_config
from helpers.tools.trainer import TrainConfig, train
from helpers.train import evaluate_counts

# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("model", ["heatmap_cnn", "csrnet"])
@pytest.mark.parametrize("part", ["A", "B"])
def test_recommended_config_full_and_quick(model, part, tmp_path, monkeypatch):
    monkeypatch.delenv("CROWD_QUICK", raising=False)
    full = recommended_config(model.upper().replace("_", "-"), f"part_{part.lower()}", tmp_path / "run")
    assert isinstance(full, TrainConfig)
    assert (full.model, full.part, full.out) == (model, part, str(tmp_path / "run"))
    for key, value in FULL[(model, part)].items():
        assert getattr(full, key) == value, key
    assert full.max_fit is None and full.max_val is None  # all images in full mode
    full.resolved()  # a valid configuration

    monkeypatch.setenv("CROWD_QUICK", "1")
    quick = recommended_config(model, part, tmp_path / "run")
    assert quick == recommended_config(model, part, tmp_path / "run", quick=True)
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(quick, f.name) != getattr(full, f.name)}
    assert changed == set(QUICK[model]) - {k for k, v in QUICK[model].items() if getattr(full, k) == v}
    # quick mode changes sizes and iteration counts only (the resolution, with the initial output per
    # cell scaled to it; the length of the weight average and of the recalibration; how often to validate)
    assert changed <= {"max_fit", "max_val", "epochs", "crop", "batch_size", "warmup_epochs", "checkpoint_every",
                       "resize", "model_kwargs", "val_every", "ema_decay", "bn_recalibrate"}
    if "model_kwargs" in changed:
        assert {k for k in quick.model_kwargs if quick.model_kwargs[k] != full.model_kwargs.get(k)} == {"init_output"}
    assert quick.max_fit <= 16 and quick.epochs * -(-quick.max_fit // quick.batch_size) <= 256  # optimiser steps
    monkeypatch.delenv("CROWD_QUICK")
    assert recommended_config(model, part, tmp_path / "run", quick=True) == quick


def test_recommended_config_overrides_and_errors(tmp_path):
    cfg = recommended_config("heatmap_cnn", "B", tmp_path, quick=False, epochs=7, max_minutes=2.5, lr=3e-4)
    assert (cfg.epochs, cfg.max_minutes, cfg.lr) == (7, 2.5, 3e-4)
    a = recommended_config("heatmap_cnn", "B", tmp_path, quick=False)
    a.rescale.append(9.0)  # a fresh list every call: no shared mutable state
    assert recommended_config("heatmap_cnn", "B", tmp_path, quick=False).rescale == FULL[("heatmap_cnn", "B")]["rescale"]
    with pytest.raises(CrowdError, match="unknown setting"):
        recommended_config("heatmap_cnn", "B", tmp_path, learning_rate=1e-3)
    with pytest.raises(CrowdError, match="No recipe"):
        recommended_config("mcnn", "B", tmp_path)
    with pytest.raises(CrowdError, match="No recipe"):
        recommended_config("csrnet", "C", tmp_path)
    with pytest.raises(CrowdError, match="max-minutes"):
        TrainConfig(max_minutes=0).resolved()


def test_epochs_for_budget():
    # 360 images in batches of 8 = 45 steps; at 0.5 steps/s an epoch is 90 s, + 10 s validation
    assert epochs_for_budget(360, 8, 10, 0.5, val_seconds=10) == 6  # 600 s // 100 s
    assert epochs_for_budget(360, 8, 10, 0.5, val_seconds=10, setup_seconds=150) == 4  # 450 // 100
    assert epochs_for_budget(361, 8, 10, 0.5) == 6  # 46 steps = 92 s: 600 // 92
    assert epochs_for_budget(10, 8, 0.01, 0.1) == 1  # at least one
    with pytest.raises(CrowdError):
        epochs_for_budget(10, 8, 0, 1.0)


# --------------------------------------------------------------------------- wall-clock budget


@pytest.fixture(scope="module")
def tiny_root(tiny_shtech) -> Path:
    """12 noisy 96 x 128 JPEGs with 3-30 dark 'heads' each, ShanghaiTech layout, part B
    (tests/conftest.py)."""
    return tiny_shtech


def test_max_minutes_stops_mid_epoch_validates_and_resumes_exactly(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CROWD_DATA", str(tiny_root))
    monkeypatch.setenv("CROWD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CROWD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CROWD_QUICK", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = {"model_kwargs": {"width": 8}, "batch_size": 2, "crop": 64, "device": "cpu", "workers": 0,
                "epochs": 2, "checkpoint_every": 0, "scheduler": "cosine"}
        # A simulated clock that advances one second each time it is read: read once at the start,
        # once before the epoch and once after every step, so a 4-second budget runs out after
        # step 3 of the 6 steps of an epoch (11 fit images in batches of 2).
        ticks = iter(range(10**6))
        stopped = train(TrainConfig(out=str(tmp_path / "cut"), max_minutes=4 / 60, **base),
                        clock=lambda: float(next(ticks)))
        assert stopped.stop_reason == "time" and not stopped.stopped_early
        ts = stopped.time_stop
        assert ts is not None and (ts["epoch"], ts["batch_in_epoch"], ts["step"]) == (1, 3, 3)
        assert stopped.history == []  # no epoch was completed
        # the partial epoch's weights were validated and kept as best.pt: check against a fresh evaluation
        assert ts["improved"] and stopped.best_epoch == 1 and stopped.best_val_mae == ts["val_mae"]
        model, info = load_model(stopped.best, device="cpu")
        val = CrowdDataset(list_records("B", "val", str(tiny_root)), "eval")
        again = evaluate_counts(model, val, scale=info.scale, device="cpu")
        assert again["mae"] == pytest.approx(ts["val_mae"], rel=1e-6, abs=1e-9)
        last = load_checkpoint(stopped.last)
        assert last["batch_in_epoch"] == ts["batch_in_epoch"] and last["stop_reason"] == "time"

        # resuming without a budget ends bitwise where an uninterrupted run ends
        resumed = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **base))
        reference = train(TrainConfig(out=str(tmp_path / "ref"), **base))
        assert resumed.stop_reason == reference.stop_reason == "epochs" and resumed.time_stop is None
        a, b = load_checkpoint(resumed.last)["model"], load_checkpoint(reference.last)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]
        assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in reference.history]
    finally:
        torch.set_num_threads(threads)
