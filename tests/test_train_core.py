"""The core training functions (helpers/train.py), checked against hand-written PyTorch, and the
conversion of a TrainConfig to ``crowd train`` arguments (helpers/tools/trainer.py)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from helpers import train as core
from helpers.errors import CrowdError
from helpers.models import build_model
from helpers.tools import cli
from helpers.tools.recipes import recommended_config
from helpers.tools.trainer import TrainConfig, config_from_args, config_to_argv

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batch(seed: int = 0, n: int = 3, side: int = 32):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, side, side, generator=g)
    targets = torch.rand(n, 1, side // 8, side // 8, generator=g) * 0.05
    return images, targets


# --------------------------------------------------------------------------- density_loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_density_loss_against_numpy(reduction):
    pred, target = torch.rand(2, 1, 3, 4) * 5, torch.rand(2, 1, 3, 4) * 0.05
    scale, weight = 100.0, 0.3
    p, t = pred.double().numpy(), target.double().numpy() * scale
    mse = ((p - t) ** 2).mean() if reduction == "mean" else ((p - t) ** 2).sum() / 2
    counts = (p.sum(axis=(1, 2, 3)) - t.sum(axis=(1, 2, 3))) / scale
    expected = mse + weight * (counts**2).mean()
    got = core.density_loss(pred, target, scale=scale, reduction=reduction, count_weight=weight)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(CrowdError, match="does not match the target"):
        core.density_loss(pred, target[:, :, :2])
    with pytest.raises(CrowdError, match="reduction"):
        core.density_loss(pred, target, reduction="max")


# --------------------------------------------------------------------------- train_step


@pytest.mark.parametrize("amp", [False, True])
def test_train_step_equals_a_hand_written_step_bitwise(amp):
    """Forward (autocast when amp), MSE on scale x targets, backward through a GradScaler,
    unscale and clip, step: the same numbers as the plain PyTorch written out here."""
    torch.manual_seed(0)
    model = build_model("heatmap_cnn", width=8)
    twin = copy.deepcopy(model)
    opt, twin_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(twin.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=amp)
    twin_scaler = torch.amp.GradScaler("cpu", enabled=amp)
    scale, clip = 100.0, 0.5
    for seed in range(3):
        images, targets = _batch(seed)
        got = core.train_step(model, images, targets, opt, scaler, scale=scale, grad_clip=clip, amp=amp)
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            pred = twin.loss_output(images)
        loss = ((pred.float() - targets * scale) ** 2).mean()
        twin_opt.zero_grad(set_to_none=True)
        twin_scaler.scale(loss).backward()
        twin_scaler.unscale_(twin_opt)
        torch.nn.utils.clip_grad_norm_(list(twin.parameters()), clip)
        twin_scaler.step(twin_opt)
        twin_scaler.update()
        assert got == loss.item()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_train_step_without_scaler_and_divergence():
    torch.manual_seed(0)
    model = build_model("heatmap_cnn", width=8)
    twin = copy.deepcopy(model)
    opt, twin_opt = torch.optim.SGD(model.parameters(), lr=1e-3), torch.optim.SGD(twin.parameters(), lr=1e-3)
    images, targets = _batch()
    got = core.train_step(model, images, targets, opt, scale=10.0, reduction="sum")
    loss = ((twin.loss_output(images) - targets * 10.0) ** 2).sum() / images.shape[0]
    twin_opt.zero_grad()
    loss.backward()
    twin_opt.step()
    assert got == loss.item()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CrowdError, match="diverged"):
        core.train_step(model, images, targets * float("nan"), opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no step


# --------------------------------------------------------------------------- epoch, evaluation, fit


def test_train_one_epoch_is_the_mean_of_its_steps():
    torch.manual_seed(0)
    model = build_model("heatmap_cnn", width=8)
    twin = copy.deepcopy(model)
    batches = [_batch(seed) for seed in range(4)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mean = core.train_one_epoch(model, batches, opt, device="cpu", scheduler=sched, scale=100.0,
                                grad_clip=1.0, progress=False)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin_opt, step_size=1, gamma=0.5)
    losses = []
    for images, targets in batches:
        losses.append(core.train_step(twin, images, targets, twin_opt, scale=100.0, grad_clip=1.0))
        twin_sched.step()
    assert mean == pytest.approx(float(np.mean(losses)), rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    assert np.isnan(core.train_one_epoch(model, [], opt, device="cpu", progress=False))


class _Images:
    """A stand-in eval dataset: item i is (image, target), true_count(i) a number."""

    def __init__(self, images, counts):
        self.images, self.counts = images, counts

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], torch.zeros(1, 1, 1)

    def true_count(self, i):
        return self.counts[i]


def test_evaluate_counts_against_direct_sums():
    torch.manual_seed(0)
    model = build_model("heatmap_cnn", width=8).eval()
    images = [torch.randn(3, 32, 40), torch.randn(3, 48, 24)]
    data = _Images(images, [3, 1])
    result = core.evaluate_counts(model, data, scale=50.0, device="cpu")
    with torch.no_grad():
        pred = [float(model(x[None]).sum()) / 50.0 for x in images]
    err = np.array(pred) - np.array([3.0, 1.0])
    assert result["pred"] == pytest.approx(pred, rel=1e-6) and result["true"] == [3.0, 1.0]
    assert result["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-6)
    assert result["rmse"] == pytest.approx(np.sqrt((err**2).mean()), rel=1e-6)
    assert result["bias"] == pytest.approx(err.mean(), rel=1e-6)
    model.train()
    core.evaluate_counts(model, data, scale=50.0, device="cpu")
    assert model.training  # the mode is restored


def test_fit_lowers_the_loss_on_a_tiny_set(tiny_shtech, capsys):
    from helpers.data import list_records
    from helpers.samples import CrowdDataset

    records = list_records("B", "fit", str(tiny_shtech))
    train_set = CrowdDataset(records[:8], "train", crop=64, seed=0)
    val_set = CrowdDataset(records[8:], "eval")
    fixed = [train_set[(0, i)] for i in range(len(train_set))]  # the crops of epoch 0
    x, y = torch.stack([s[0] for s in fixed]), torch.stack([s[1] for s in fixed])

    def loss_on_fixed_crops(model):
        model.eval()
        with torch.no_grad():
            return float(core.density_loss(model(x), y, scale=100.0))

    torch.manual_seed(0)
    model = build_model("heatmap_cnn", width=8)
    before = loss_on_fixed_crops(model)
    rows = []
    history = core.fit(model, train_set, val_set, epochs=4, lr=1e-2, batch_size=4, device="cpu",
                       progress=False, callback=rows.append)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4] and rows == history
    assert loss_on_fixed_crops(model) < 0.98 * before  # (233.6 -> 223.2 when written)
    assert history[1]["lr"] < history[0]["lr"] == 1e-2  # cosine decay
    again = core.evaluate_counts(model, val_set, scale=100.0, device="cpu")
    assert history[-1]["val_mae"] == pytest.approx(again["mae"], rel=1e-9)
    assert capsys.readouterr().out.count("epoch ") == 4  # one line per epoch


# --------------------------------------------------------------------------- config_to_argv


def _round_trip(cfg: TrainConfig) -> TrainConfig:
    args = cli.build_parser("train").parse_args(config_to_argv(cfg))
    return config_from_args(args)


@pytest.mark.parametrize("model", ["heatmap_cnn", "csrnet"])
@pytest.mark.parametrize("part", ["A", "B"])
def test_config_to_argv_round_trips_the_recipes(model, part, tmp_path):
    cfg = recommended_config(model, part, tmp_path / "run", quick=False)
    assert _round_trip(cfg) == cfg


def test_config_to_argv_round_trips_every_option(tmp_path):
    cfg = TrainConfig(
        model="csrnet", model_kwargs={"pretrained": None, "batch_norm": True, "tag": "7"}, part="A",
        data_root=str(tmp_path / "data"), epochs=3, batch_size=2, crop=128, resize=0.25, flip=False,
        rescale=[0.7, 1.3], gray_prob=0.1, density_method="fixed", density_sigma=2.5, optimizer="sgd",
        lr=1e-7, momentum=0.9, weight_decay=1e-4, scheduler="plateau", warmup_epochs=0.5,
        min_lr_ratio=0.05, plateau_factor=0.2, plateau_patience=2, scale=1.0, loss="bayesian",
        reduction="sum", loss_kwargs={"sigma": 3.0, "background": 0.5}, count_loss_weight=0.01,
        grad_clip=0.0, ema_decay=0.99, bn_recalibrate=4, count_calibration=True, seed=3, patience=5,
        init=str(tmp_path / "base" / "best.pt"),
        val_every=2, max_fit=10, max_val=3, out=str(tmp_path / "run"), resume=True,
        checkpoint_every=7, device="cpu", workers=1, cache_in_memory=True, amp=False,
        channels_last=False, deterministic=True, max_minutes=1.5,
    )
    defaults = TrainConfig()
    assert all(getattr(cfg, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(cfg))
    argv = config_to_argv(cfg)
    assert _round_trip(cfg) == cfg
    assert "--pretrained" in argv and "--no-flip" in argv and "--resume" in argv
    assert config_to_argv(TrainConfig()) == []
    with pytest.raises(CrowdError, match="no crowd train option"):
        config_to_argv(dataclasses.replace(defaults, rescale=None, flip=None))
