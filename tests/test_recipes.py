"""Recipes (recommended settings, CPU and GPU), the density-sigma default, and the wall-clock budget.

The budget test trains a tiny HeatmapCNN (width 8) on 64 x 64 crops of 12 synthetic 96 x 128
images, with a simulated clock so that the budget ends at a known step. The GPU recipe's code
path runs on the CPU on the same images with tiny sizes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers.data import list_records
from helpers.errors import CrowdError
from helpers.samples import CrowdDataset
from helpers.tools import cli, recipes
from helpers.tools.checkpoints import load_checkpoint, load_model
from helpers.tools.recipes import FULL, GPU, QUICK, epochs_for_budget, recommended_config
from helpers.tools.trainer import RUN_IDENTITY, TrainConfig, config_from_args, train
from helpers.train import evaluate_counts

# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("model", ["heatmap_cnn", "csrnet"])
@pytest.mark.parametrize("part", ["A", "B"])
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_recommended_config_full_and_quick(model, part, kind, tmp_path, monkeypatch):
    if (model, part) not in (GPU if kind == "gpu" else FULL):
        pytest.skip(f"{model} has no {kind} recipe")
    table = GPU if kind == "gpu" else FULL
    monkeypatch.delenv("CROWD_QUICK", raising=False)
    monkeypatch.delenv("CROWD_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: kind == "gpu")  # the recipe follows the device
    full = recommended_config(model.upper().replace("_", "-"), f"part_{part.lower()}", tmp_path / "run")
    assert isinstance(full, TrainConfig)
    assert (full.model, full.part, full.out) == (model, part, str(tmp_path / "run"))
    assert full == recommended_config(model, part, tmp_path / "run", kind=kind, quick=False)
    for key, value in table[(model, part)].items():
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


def _no_mps(monkeypatch):
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)


@pytest.mark.parametrize("part", ["A", "B"])
def test_csrnet_recipe_is_chosen_by_device(part, tmp_path, monkeypatch):
    monkeypatch.delenv("CROWD_DEVICE", raising=False)
    _no_mps(monkeypatch)
    # a CUDA device (mocked): the GPU recipe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert recipes.choose_recipe("csrnet") == ("gpu", "CUDA found")
    gpu = recommended_config("csrnet", part, tmp_path / "run", quick=False)
    assert {k: getattr(gpu, k) for k in GPU[("csrnet", part)]} == GPU[("csrnet", part)]
    # what the GPU recipe is: full resolution, ImageNet weights, Adam 1e-5 on targets x100 with a
    # pixel-mean MSE (the C^3 Framework's settings), mixed precision, a budget below a Colab session
    assert (gpu.resize, gpu.model_kwargs["pretrained"], gpu.optimizer, gpu.lr, gpu.scale, gpu.reduction) == (
        1.0, "imagenet", "adam", 1e-5, 100.0, "mean")
    assert gpu.amp and gpu.max_minutes is not None and 0 < gpu.max_minutes < 12 * 60
    assert gpu.crop > FULL[("csrnet", part)]["crop"] and FULL[("csrnet", part)]["resize"] == 0.5
    assert recipes.run_name("csrnet", part, _source(tmp_path), quick=False) == f"csrnet_{part}_gpu"
    # the point-supervised loss works with it: the paper's lengths at full resolution
    bayes = recommended_config("csrnet", part, tmp_path / "run", quick=False, loss="bayesian")
    assert bayes.loss_kwargs == {"sigma": 8.0} and bayes.resolved().loss == "bayesian"
    # an explicit CPU device, or a model without a GPU recipe, keeps the CPU recipe on a CUDA machine
    on_cpu = recommended_config("csrnet", part, tmp_path / "run", quick=False, device="cpu")
    assert on_cpu.device == "cpu" and on_cpu.resize == FULL[("csrnet", part)]["resize"]
    assert recipes.choose_recipe("heatmap_cnn")[0] == "cpu"
    assert recommended_config("heatmap_cnn", part, tmp_path, quick=False).resize == FULL[("heatmap_cnn", part)]["resize"]
    # no CUDA: the CPU recipe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert recipes.choose_recipe("csrnet") == ("cpu", "no GPU")
    cpu = recommended_config("csrnet", part, tmp_path / "run", quick=False)
    assert {k: getattr(cpu, k) for k in FULL[("csrnet", part)]} == FULL[("csrnet", part)]
    assert recipes.run_name("csrnet", part, _source(tmp_path), quick=False) == f"csrnet_{part}"
    with pytest.raises(CrowdError, match="recipe kind"):
        recommended_config("csrnet", part, tmp_path, kind="tpu")
    with pytest.raises(CrowdError, match="No recipe"):
        recommended_config("heatmap_cnn", part, tmp_path, kind="gpu")


def _source(root):
    from helpers.data import DataSource

    return DataSource(root, synthetic=False, origin="test")


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


# --------------------------------------------------------------------------- the density sigma


def test_fixed_kernels_need_a_sigma_and_adaptive_ones_keep_4px(tmp_path, capsys):
    assert TrainConfig().density_sigma is None
    assert TrainConfig().resolved().density_sigma == 4.0  # the lone-head sigma of adaptive kernels
    assert TrainConfig(density_method="fixed", density_sigma=15.0).resolved().density_sigma == 15.0
    with pytest.raises(CrowdError, match="fixed needs --density-sigma"):
        TrainConfig(density_method="fixed").resolved()
    # the command line: the same rule, one error line, exit status 1
    parser = cli.build_parser("train")
    with pytest.raises(CrowdError, match="fixed needs --density-sigma"):
        config_from_args(parser.parse_args(["--density-method", "fixed"])).resolved()
    assert cli.main(["train", "--density-method", "fixed", "--out", str(tmp_path / "run")]) == 1
    assert "fixed needs --density-sigma" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert "required with --density-method fixed" in " ".join(parser.format_help().split())
    # an old config.json (density_sigma stored as 4.0) reads back and has the identity of a new run
    old = TrainConfig(out=str(tmp_path / "old")).resolved().to_dict()
    assert old["density_sigma"] == 4.0
    again = TrainConfig.from_dict({k: v for k, v in old.items() if k != "density_sigma"}).resolved().to_dict()
    assert {k: again[k] for k in RUN_IDENTITY} == {k: old[k] for k in RUN_IDENTITY}
    assert TrainConfig.from_dict(old).density_sigma == 4.0


# --------------------------------------------------------------------------- wall-clock budget


def test_max_minutes_stops_mid_epoch_validates_and_resumes_exactly(tiny_training_env, tmp_path):
    tiny_root = tiny_training_env
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


@pytest.mark.parametrize("loss", ["mse", "bayesian"])
def test_gpu_recipe_code_path_runs_on_cpu_with_tiny_sizes(loss, tiny_training_env, tmp_path):
    """The GPU recipe, shrunk (quick mode and tiny crops) and trained on the CPU: AMP stays off there,
    the run completes and validates, and best.pt scores what an independent evaluation gives."""
    tiny_root = tiny_training_env
    cfg = recommended_config("csrnet", "B", tmp_path / "run", kind="gpu", quick=True, device="cpu", loss=loss,
                             crop=64, max_fit=4, max_val=1, epochs=1, workers=0,
                             model_kwargs={"pretrained": None})  # no ImageNet download in a test
    gpu = GPU[("csrnet", "B")]
    assert (cfg.amp, cfg.resize, cfg.optimizer, cfg.lr, cfg.weight_decay) == (
        True, 1.0, "adam", gpu["lr"], gpu["weight_decay"])
    result = train(cfg)
    assert result.stop_reason == "epochs" and [int(r["epoch"]) for r in result.history] == [1]
    row = result.history[0]
    assert all(np.isfinite(row[k]) for k in ("train_loss", "val_mae", "val_rmse"))
    last = load_checkpoint(result.last)
    assert last["scaler"] == {}, "AMP (the GradScaler) must be off on the CPU"
    assert last["config"]["amp"] is True and last["config"]["loss"] == loss
    model, info = load_model(result.best, device="cpu")
    val = CrowdDataset(list_records("B", "val", str(tiny_root)), "eval", resize=cfg.resize)
    again = evaluate_counts(model, val, scale=info.scale, device="cpu")
    assert again["mae"] == pytest.approx(result.best_val_mae, rel=1e-5, abs=1e-6)
