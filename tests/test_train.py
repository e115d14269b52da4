"""Training loop: exact resume after SIGKILL, extension, DDP, checkpoints, NaN guard, outputs.

Everything runs on a tiny HeatmapCNN (width 8) with 64 x 64 crops of 96 x 128 synthetic images,
written in the ShanghaiTech layout into a temporary folder.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import train as core
from helpers.errors import CheckpointError, CrowdError
from helpers.models import build_model
from helpers.tools import cli
from helpers.tools import trainer as train_mod
from helpers.tools.checkpoints import load_checkpoint, load_model, save_checkpoint
from helpers.tools.trainer import TrainConfig, read_history, train

N_IMAGES = 12  # fit 11 (6 batches of 2), val 1
TINY = ["--model-arg", "width=8", "--batch-size", "2", "--crop", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_root(tiny_shtech) -> Path:
    """12 noisy 96 x 128 JPEGs with 3-30 dark 'heads' each, ShanghaiTech layout, part B
    (tests/conftest.py; also used by test_faults.py)."""
    return tiny_shtech


@pytest.fixture()
def env(tiny_root, tmp_path, monkeypatch) -> dict[str, str]:
    """Settings for this test, applied in-process and returned for subprocesses."""
    values = {
        "CROWD_DATA": str(tiny_root),
        "CROWD_HOME": str(tmp_path / "home"),
        "CROWD_CACHE": str(tmp_path.parent / "shared_cache"),  # density maps: reused across tests
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in ("CROWD_QUICK", "CROWD_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    full = {k: v for k, v in os.environ.items() if not k.startswith("CROWD_")}
    full.update(values)
    full["OMP_NUM_THREADS"] = "1"
    full["PYTHONUNBUFFERED"] = "1"
    return full


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


DRIVER = Path(__file__).with_name("train_driver.py")  # crowd train with test-side hooks


def _cli(args, env, hooks: dict | None = None, **kwargs) -> subprocess.Popen:
    """``python -m helpers train ARGS``; with ``hooks`` through tests/train_driver.py."""
    start = [str(DRIVER), json.dumps(hooks)] if hooks else ["-m", "helpers", "train"]
    return subprocess.Popen(
        [sys.executable, *start, *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _strip_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _config(out: Path, **overrides) -> TrainConfig:
    values = {"model_kwargs": {"width": 8}, "batch_size": 2, "crop": 64, "device": "cpu",
              "workers": 0, "out": str(out), "scheduler": "plateau"}
    values.update(overrides)
    return TrainConfig(**values)


# --------------------------------------------------------------------------- exact resume


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(env, tmp_path):
    args = [*TINY, "--epochs", "3", "--checkpoint-every", "4", "--rescale", "0.8", "1.2",
            "--gray-prob", "0.3", "--workers", "1", "--scheduler", "cosine"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _cli([*args, "--out", str(ref_dir)], env)
    # a slow run: time for the test to act mid-epoch
    run = _cli([*args, "--out", str(run_dir)], env, hooks={"step_delay": 0.25})
    seen = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and run.poll() is None:
        if (run_dir / "last.pt").exists():
            ckpt = load_checkpoint(run_dir / "last.pt")
            if ckpt["epoch"] >= 1 and ckpt["batch_in_epoch"] > 0:  # mid-way through epoch 2 or 3
                run.send_signal(signal.SIGKILL)
                seen = (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"])
                break
        time.sleep(0.03)
    run.communicate(timeout=30)
    assert seen is not None, "the run finished before a mid-epoch checkpoint was seen"
    assert run.returncode == -signal.SIGKILL
    # 6 steps per epoch, a checkpoint every 4 steps: mid-epoch checkpoints at steps 8 and 16
    assert seen in [(1, 2, 8), (2, 4, 16)], seen
    assert not (run_dir / "best.pt").exists() or load_checkpoint(run_dir / "best.pt")["epoch"] <= seen[0]

    out = _finish(_cli([*args, "--out", str(run_dir), "--resume"], env))
    assert f"epoch {seen[0] + 1} of 3" in out, out  # it continued, it did not start again
    assert "epoch 3/3" in out
    _finish(ref)
    a, b = load_checkpoint(ref_dir / "last.pt"), load_checkpoint(run_dir / "last.pt")
    _assert_same_tensors(a["model"], b["model"])
    assert a["step"] == b["step"] == 18 and a["epoch"] == b["epoch"] == 3
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        _assert_same_tensors(pa, pb)
    assert _strip_seconds(a["history"]) == _strip_seconds(b["history"])
    assert _strip_seconds(read_history(run_dir)) == _strip_seconds(read_history(ref_dir))
    _assert_same_tensors(load_checkpoint(ref_dir / "best.pt")["model"],
                         load_checkpoint(run_dir / "best.pt")["model"])


def test_resume_extends_a_shorter_run(env, tmp_path):
    direct = train(_config(tmp_path / "direct", epochs=3))
    train(_config(tmp_path / "ext", epochs=2))
    extended = train(_config(tmp_path / "ext", epochs=3, resume=True))
    _assert_same_tensors(load_checkpoint(direct.last)["model"], load_checkpoint(extended.last)["model"])
    assert len(extended.history) == 3
    assert _strip_seconds(direct.history) == _strip_seconds(extended.history)
    # nothing left to do: the weights do not change
    again = train(_config(tmp_path / "ext", epochs=3, resume=True))
    _assert_same_tensors(load_checkpoint(again.last)["model"], load_checkpoint(extended.last)["model"])


def test_resume_refuses_other_settings_and_overwrites(env, tmp_path):
    train(_config(tmp_path / "r", epochs=1))
    with pytest.raises(CrowdError, match="batch_size"):
        train(_config(tmp_path / "r", epochs=2, batch_size=4, resume=True))
    with pytest.raises(CrowdError, match="--resume"):
        train(_config(tmp_path / "r", epochs=2))


def test_resume_refuses_another_dataset(env, tiny_root, tmp_path, monkeypatch):
    train(_config(tmp_path / "r", epochs=1))
    moved = tmp_path / "other_copy"
    moved.symlink_to(tiny_root)  # same files, but a different dataset folder by name
    monkeypatch.setenv("CROWD_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(CrowdError, match="trained on the dataset at"):
        train(_config(tmp_path / "r", epochs=2, resume=True, data_root=str(tmp_path / "elsewhere")))
    # a symlink to the same folder is the same dataset: resuming through it works
    result = train(_config(tmp_path / "r", epochs=2, resume=True, data_root=str(moved)))
    assert len(result.history) == 2


# --------------------------------------------------------------------------- outputs


def test_history_config_and_best_checkpoint(env, tmp_path):
    rows = []
    result = train(_config(tmp_path / "h", epochs=3, lr=3e-3), callback=rows.append)
    out = tmp_path / "h"
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "history.csv", "config.json"}
    history = read_history(out)
    assert [r["epoch"] for r in history] == [1, 2, 3] and [r["step"] for r in history] == [6, 12, 18]
    assert list(history[0]) == list(train_mod.HISTORY_COLUMNS)
    assert len(rows) == 3 and rows[-1]["epoch"] == 3
    for row, mem in zip(history, result.history, strict=True):
        assert all(math.isfinite(row[k]) for k in ("train_loss", "val_mae", "val_rmse", "lr", "seconds"))
        assert row["val_mae"] == pytest.approx(mem["val_mae"], rel=1e-12)
    config = json.loads((out / "config.json").read_text())
    assert config == result.config.to_dict()
    assert config["lr"] == 3e-3 and config["scale"] == 100.0 and config["model_kwargs"] == {"width": 8}
    maes = [r["val_mae"] for r in history]
    best_epoch = int(np.argmin(maes)) + 1
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == best_epoch == result.best_epoch
    assert best["val_mae"] == pytest.approx(min(maes), rel=1e-12)
    # best.pt really is the model of that epoch: re-evaluating it gives the recorded MAE
    from helpers.data import list_records
    from helpers.samples import CrowdDataset

    model, info = load_model(out / "best.pt", device="cpu", expect_model="heatmap_cnn")
    assert info.scale == 100.0 and info.model_kwargs == {"width": 8}
    val = CrowdDataset(list_records("B", "val"), "eval")
    metrics = core.evaluate_counts(model, val, scale=info.scale, device="cpu")
    assert metrics["mae"] == pytest.approx(min(maes), rel=1e-5)
    assert metrics["true"] == [float(val.true_count(0))]


def test_ema_update_matches_the_formula():
    torch.manual_seed(0)
    model = build_model("heatmap_cnn", width=8)
    ema = build_model("heatmap_cnn", width=8)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    step, decay = 50, 0.99
    train_mod.ema_update(ema, model, decay, step)
    d = min(decay, (1 + step) / (10 + step))  # 0.85: the warm-up caps the decay early on
    assert d == pytest.approx(51 / 60)
    for key, new in model.state_dict().items():
        got = ema.state_dict()[key]
        if new.dtype.is_floating_point:
            torch.testing.assert_close(got, d * before[key] + (1 - d) * new, rtol=1e-6, atol=1e-7)
        else:  # BatchNorm's num_batches_tracked is copied
            assert torch.equal(got, new), key


def test_ema_run_resumes_exactly_and_keeps_the_average_as_best(env, tmp_path):
    direct = train(_config(tmp_path / "direct", epochs=3, ema_decay=0.9))
    train(_config(tmp_path / "ext", epochs=2, ema_decay=0.9))
    resumed = train(_config(tmp_path / "ext", epochs=3, ema_decay=0.9, resume=True))
    a, b = load_checkpoint(direct.last), load_checkpoint(resumed.last)
    _assert_same_tensors(a["model"], b["model"])
    _assert_same_tensors(a["ema"], b["ema"])
    assert not all(torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])  # a real average
    assert _strip_seconds(direct.history) == _strip_seconds(resumed.history)
    # best.pt holds the averaged weights: re-evaluating them gives the recorded validation MAE
    from helpers.data import list_records
    from helpers.samples import CrowdDataset

    model, info = load_model(direct.best, device="cpu", expect_model="heatmap_cnn")
    val = CrowdDataset(list_records("B", "val"), "eval")
    metrics = core.evaluate_counts(model, val, scale=info.scale, device="cpu")
    assert metrics["mae"] == pytest.approx(direct.best_val_mae, rel=1e-5)
    if direct.best_epoch == 3:
        _assert_same_tensors(load_checkpoint(direct.best)["model"], a["ema"])
    with pytest.raises(CrowdError, match="ema-decay"):
        train(_config(tmp_path / "bad", epochs=1, ema_decay=1.0))


def test_recalibrate_batchnorm_gives_the_average_of_per_image_statistics():
    """Independent check: the first BatchNorm's running mean/variance are the plain averages of
    the per-image mean and (unbiased) variance of its input, taken with a forward hook."""
    torch.manual_seed(0)
    model = build_model("heatmap_cnn", width=8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = [torch.randn(1, 3, 32 + 8 * i, 40) for i in range(3)]  # different sizes
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    handle = first_bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    with torch.no_grad():
        for x in images:
            model(x)
    handle.remove()
    fresh = train_mod.recalibrate_batchnorm(model, iter(images))
    assert not fresh.training
    for key, value in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key]), key
    bn = next(m for m in fresh.modules() if isinstance(m, torch.nn.BatchNorm2d))
    means = torch.stack([a.mean(dim=(0, 2, 3)) for a in seen])
    variances = torch.stack([a.var(dim=(0, 2, 3), unbiased=True) for a in seen])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == first_bn.momentum  # restored after the cumulative average
    for (k, a), b in zip(fresh.named_parameters(), model.parameters(), strict=True):  # weights kept
        assert torch.equal(a, b), k


def test_bn_recalibrated_run_resumes_exactly_and_saves_the_recalibrated_weights(env, tmp_path):
    kw = {"ema_decay": 0.9, "bn_recalibrate": 3}
    direct = train(_config(tmp_path / "direct", epochs=3, **kw))
    train(_config(tmp_path / "ext", epochs=2, **kw))
    resumed = train(_config(tmp_path / "ext", epochs=3, resume=True, **kw))
    a, b = load_checkpoint(direct.last), load_checkpoint(resumed.last)
    _assert_same_tensors(a["model"], b["model"])
    _assert_same_tensors(a["ema"], b["ema"])
    assert _strip_seconds(direct.history) == _strip_seconds(resumed.history)
    best = load_checkpoint(direct.best)
    # weights are the average's, BatchNorm statistics are recomputed (not the averaged ones)
    assert direct.best_epoch == 3  # (this tiny run improves every epoch; the check needs it)
    ema_at_best = a["ema"]
    for key, value in best["model"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, ema_at_best[key]), key
    assert any(not torch.equal(best["model"][k], ema_at_best[k]) for k in best["model"] if "running_var" in k)
    from helpers.data import list_records
    from helpers.samples import CrowdDataset

    model, info = load_model(direct.best, device="cpu", expect_model="heatmap_cnn")
    val = CrowdDataset(list_records("B", "val"), "eval")
    metrics = core.evaluate_counts(model, val, scale=info.scale, device="cpu")
    assert metrics["mae"] == pytest.approx(direct.best_val_mae, rel=1e-5)
    with pytest.raises(CrowdError, match="bn-recalibrate"):
        train(_config(tmp_path / "bad", epochs=1, bn_recalibrate=-1))


def test_count_calibration_fits_the_gain_on_fit_images_and_best_pt_applies_it(env, tmp_path):
    """best.pt's count_gain is sum(true) / sum(pred) over the recalibration images (checked
    independently), the loaded model's scale divides by it, and validation MAE uses it."""
    from helpers.data import list_records, take_evenly
    from helpers.samples import CrowdDataset
    from helpers.tools.trainer import recalibrate_batchnorm

    kw = {"ema_decay": 0.9, "bn_recalibrate": 4, "count_calibration": True, "epochs": 2}
    result = train(_config(tmp_path / "cal", **kw))
    best = load_checkpoint(result.best)
    raw, info = load_model(result.best, device="cpu", expect_model="heatmap_cnn")
    fit_images = CrowdDataset(take_evenly(list_records("B", "fit"), 4), "eval")
    plain = core.evaluate_counts(recalibrate_batchnorm(raw, (fit_images[i][0][None] for i in range(4))),
                                 fit_images, scale=best["scale"], device="cpu")
    expected = sum(plain["true"]) / sum(plain["pred"])
    assert best["count_gain"] == pytest.approx(expected, rel=1e-5) and best["count_gain"] != 1.0
    assert info.scale == pytest.approx(best["scale"] / best["count_gain"], rel=1e-12)
    val = CrowdDataset(list_records("B", "val"), "eval")
    assert core.evaluate_counts(raw, val, scale=info.scale, device="cpu")["mae"] == pytest.approx(
        result.best_val_mae, rel=1e-5)
    with pytest.raises(CrowdError, match="bn-recalibrate"):
        train(_config(tmp_path / "bad", epochs=1, count_calibration=True))


def test_early_stopping_and_best_epoch(env, tmp_path, monkeypatch):
    maes = iter([5.0, 4.0, 4.5, 4.2, 3.0, 2.0])

    def scripted(*args, **kwargs):
        mae = next(maes)
        return {"mae": mae, "rmse": mae + 1, "pred": np.zeros(1), "true": np.zeros(1)}

    monkeypatch.setattr(train_mod, "evaluate_counts", scripted)
    out = tmp_path / "es"
    result = train(_config(out, epochs=6, patience=2))
    # epochs 3 and 4 do not beat epoch 2: stop after epoch 4
    assert result.stopped_early and len(result.history) == 4
    assert result.best_epoch == 2 and result.best_val_mae == 4.0
    assert load_checkpoint(out / "best.pt")["epoch"] == 2
    assert [r["val_mae"] for r in read_history(out)] == [5.0, 4.0, 4.5, 4.2]
    # resuming with the same patience does nothing; without early stopping it goes on
    again = train(_config(out, epochs=6, patience=2, resume=True))
    assert len(again.history) == 4
    more = train(_config(out, epochs=5, patience=0, resume=True))
    assert len(more.history) == 5 and more.best_epoch == 5
    assert load_checkpoint(out / "best.pt")["epoch"] == 5


def test_quick_mode_uses_small_subsets(env, monkeypatch, tmp_path):
    monkeypatch.setenv("CROWD_QUICK", "1")
    cfg = TrainConfig(out=str(tmp_path / "q")).resolved()
    assert (cfg.max_fit, cfg.max_val) == (train_mod.QUICK_FIT, train_mod.QUICK_VAL)
    assert TrainConfig(max_fit=3).resolved().max_fit == 3
    monkeypatch.delenv("CROWD_QUICK")
    full = TrainConfig().resolved()
    assert (full.max_fit, full.max_val) == (None, None)
    assert full.out == str(tmp_path / "home" / "runs" / "heatmap_cnn_partB")
    assert full.lr == 1e-3 and TrainConfig(model="csrnet").resolved().model_kwargs == {"pretrained": "imagenet"}


def test_cli_bad_input_prints_error(env, tmp_path, capsys):
    code = cli.main(["train", "--crop", "30", "--out", str(tmp_path / "x"), "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: --crop must be")
    code = cli.main(["train", "--model", "resnet", "--out", str(tmp_path / "x")])
    assert code == 1 and "error: --model must be one of" in capsys.readouterr().err


# --------------------------------------------------------------------------- NaN guard


def test_absurd_learning_rate_stops_with_crowd_error(env, tmp_path):
    cfg = _config(tmp_path / "nan", epochs=3, optimizer="sgd", lr=1e12, grad_clip=0.0, checkpoint_every=1)
    with pytest.raises(CrowdError, match="--lr"):
        train(cfg)
    last = tmp_path / "nan" / "last.pt"
    if last.exists():  # whatever was saved is finite
        for t in load_checkpoint(last)["model"].values():
            assert bool(torch.isfinite(t.float()).all())


def test_injected_nan_stops_and_keeps_last_good_checkpoint(env, tmp_path, monkeypatch):
    real = core.density_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(core, "density_loss", poisoned)  # what train_step calls
    with pytest.raises(CrowdError, match=r"loss became nan at step 3.*--lr"):
        train(_config(tmp_path / "inj", epochs=1, checkpoint_every=1))
    ckpt = load_checkpoint(tmp_path / "inj" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["batch_in_epoch"] == 2
    assert all(bool(torch.isfinite(t.float()).all()) for t in ckpt["model"].values())


# --------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_name": "heatmap_cnn", "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="Refusing to load"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="Refusing to load"):
        load_model(path, device="cpu")
    assert not marker.exists()


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": {"w": torch.ones(3)}})
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_checkpoint_of_the_other_model_is_refused(tmp_path):
    model = build_model("heatmap_cnn", width=8)
    ckpt = {"model": model.state_dict(), "model_name": "heatmap_cnn", "model_kwargs": {"width": 8},
            "scale": 50.0}
    path = save_checkpoint(tmp_path / "hm.pt", ckpt)
    loaded, info = load_model(path, device="cpu")
    assert info.scale == 50.0 and info.model_name == "heatmap_cnn"
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match="holds a heatmap_cnn checkpoint, but a csrnet"):
        load_model(path, device="cpu", expect_model="csrnet")
    # weights of one model labelled as the other: the key check names what is wrong
    save_checkpoint(tmp_path / "mislabelled.pt", dict(ckpt, model_name="csrnet", model_kwargs={}))
    with pytest.raises(CheckpointError, match=r"does not match a csrnet network: missing \d+ key"):
        load_model(tmp_path / "mislabelled.pt", device="cpu")
    # same model, other width: shapes differ
    save_checkpoint(tmp_path / "wide.pt", dict(ckpt, model_kwargs={"width": 16}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path / "wide.pt", device="cpu")
    save_checkpoint(tmp_path / "plain.pt", {"weights": torch.ones(1)})
    with pytest.raises(CheckpointError, match="not a checkpoint written by crowd train"):
        load_model(tmp_path / "plain.pt", device="cpu")


# --------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_gloo_ranks_agree(env, tmp_path):
    out = tmp_path / "ddp"
    ddp_env = dict(env, MASTER_ADDR="127.0.0.1")
    # torchrun runs `python -m helpers train` through the driver, which saves each rank's weights
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(DRIVER), json.dumps({"save_ranks": True}),
           *TINY, "--epochs", "2", "--workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, env=ddp_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("epoch 2/2") == 1, "only rank 0 logs"
    assert "x 2 processes" in proc.stdout
    r0 = load_checkpoint(out / "rank0.pt")["model"]
    r1 = load_checkpoint(out / "rank1.pt")["model"]
    last = load_checkpoint(out / "last.pt")
    # parameters are all-reduced every step: bitwise equal on both ranks. BatchNorm running
    # statistics are per-process (rank 0's are broadcast before each forward pass).
    params = {k for k, _ in build_model("heatmap_cnn", width=8).named_parameters()}
    _assert_same_tensors({k: r0[k] for k in params}, {k: r1[k] for k in params})
    _assert_same_tensors(r0, last["model"])
    # 11 fit images over 2 ranks: 6 per rank (one padded), 3 batches of 2 per epoch
    assert last["step"] == 6 and last["world_size"] == 2 and len(last["history"]) == 2
