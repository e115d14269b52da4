"""Point-supervised losses (helpers.losses) against direct computations written here.

Everything is in float64. Tolerances: the losses against the loop versions 1e-9 relative (the same
sums in another order); Sinkhorn against the exact transport cost: the error shrinks with eps and
is below 1e-3 of the exact cost at eps = 0.003 x the mean cost (1e-9 absolute on the 3 x 3 program); DM-Count's OT term against an independent
Sinkhorn-Knopp in scaling form 1e-8 relative (both converged).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, linprog

from helpers.losses import bayesian_loss, dm_count_loss, sinkhorn

STRIDE = 8


def _case(seed=0, h=3, w=4, counts=(3, 0, 5)):
    """Random positive densities (B, 1, h, w) and head points inside the (h*8, w*8) input."""
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0.01, 0.5, (len(counts), 1, h, w))
    points = [np.column_stack([rng.uniform(0, w * STRIDE, n), rng.uniform(0, h * STRIDE, n)])
              for n in counts]
    return pred, points


def _torch(pred, points):
    return (torch.tensor(pred, dtype=torch.float64, requires_grad=True),
            [torch.tensor(p, dtype=torch.float64) for p in points])


def _centre(i, j):
    return STRIDE * (j + 0.5), STRIDE * (i + 0.5)


def _bayesian_by_loops(pred, points, sigma, background):
    total = 0.0
    for density, heads in zip(pred[:, 0], points, strict=True):
        h, w = density.shape
        if len(heads) == 0:
            total += abs(density.sum())
            continue
        expected = np.zeros(len(heads) + 1)  # the last one: background
        for i in range(h):
            for j in range(w):
                cx, cy = _centre(i, j)
                d2 = [(x - cx) ** 2 + (y - cy) ** 2 for x, y in heads]
                if background > 0:
                    d = background * min(h, w) * STRIDE
                    d2.append((d - math.sqrt(min(d2))) ** 2)
                logits = [-v / (2 * sigma**2) for v in d2]
                top = max(logits)
                weights = [math.exp(v - top) for v in logits]
                for n, wgt in enumerate(weights):
                    expected[n] += wgt / sum(weights) * density[i, j]
        total += sum(abs(1.0 - e) for e in expected[: len(heads)]) + abs(expected[len(heads)])
    return total / len(pred)


@pytest.mark.parametrize("background", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("sigma", [8.0, 3.0])
def test_bayesian_loss_against_loops(background, sigma):
    pred, points = _case()
    tp, tpts = _torch(pred, points)
    got = bayesian_loss(tp, tpts, stride=STRIDE, sigma=sigma, background=background)
    assert got.item() == pytest.approx(_bayesian_by_loops(pred, points, sigma, background), rel=1e-9)
    got.backward()
    assert torch.isfinite(tp.grad).all()


def test_bayesian_loss_without_heads_is_the_count():
    pred = torch.full((2, 1, 4, 4), 0.25, dtype=torch.float64, requires_grad=True)
    loss = bayesian_loss(pred, [torch.zeros(0, 2), torch.zeros(0, 2)])
    assert loss.item() == pytest.approx(4.0)  # |sum| = 16 x 0.25 for each image
    loss.backward()
    assert torch.allclose(pred.grad, torch.full_like(pred, 0.5))  # sign / B


def test_bayesian_far_cells_go_to_the_background():
    """One head in a corner of a large input: with the background, far cells barely count for it."""
    pred = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    pred[0, 0, -1, -1] = 1.0  # all mass on the far corner
    head = [torch.tensor([[4.0, 4.0]], dtype=torch.float64)]
    plain = bayesian_loss(pred, head, background=0.0)  # the only head takes everything: E = 1
    plus = bayesian_loss(pred, head, background=1.0)  # the background takes it: |1 - 0| + |1|
    assert float(plain) == pytest.approx(0.0, abs=1e-12)
    assert float(plus) == pytest.approx(2.0, abs=1e-6)


# --------------------------------------------------------------------------- Sinkhorn


def _sinkhorn_costs(a, b, cost, epsilons, iters):
    ta, tb, tc = (torch.tensor(v, dtype=torch.float64) for v in (a, b, cost))
    out = []
    for eps in epsilons:
        plan, f, g = sinkhorn(ta, tb, tc, eps, iters)
        assert torch.allclose(plan.sum(1), ta, atol=1e-12)  # rows: exact after the f update
        assert torch.allclose(plan.sum(0), tb, atol=1e-4)  # columns: converging (slowly for small eps)
        out.append(float((plan * tc).sum()))
    return np.array(out)


def test_sinkhorn_converges_to_the_assignment_cost():
    """Equal uniform masses on 5 + 5 points: the exact OT is the optimal assignment (Birkhoff)."""
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 10, (5, 2)), rng.uniform(0, 10, (5, 2))
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    exact = cost[rows, cols].mean()
    scale = cost.mean()
    epsilons = [scale * e for e in (1.0, 0.1, 0.01, 0.003)]
    got = _sinkhorn_costs(np.full(5, 0.2), np.full(5, 0.2), cost, epsilons, 20000)
    errors = np.abs(got - exact)
    assert np.all(np.diff(errors) < 0)  # shrinks with eps (9.35, 0.47, 0.031, 0.0068 when written)
    assert errors[-1] < 1e-3 * exact


def test_sinkhorn_converges_to_the_linear_program():
    """3 x 3 problem with unequal masses (and a zero mass): exact cost from scipy's linprog."""
    a, b = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.0, 0.9])
    cost = np.array([[1.0, 4.0, 9.0], [2.0, 0.5, 3.0], [7.0, 1.0, 0.2]])
    eq = np.vstack([np.kron(np.eye(3), np.ones(3)), np.kron(np.ones(3), np.eye(3))])
    exact = linprog(cost.ravel(), A_eq=eq, b_eq=np.concatenate([a, b]), bounds=(0, None)).fun
    got = _sinkhorn_costs(a, b, cost, [1.0, 0.1, 0.01, 0.002], 20000)
    errors = np.abs(got - exact)
    assert errors[0] > 1e-4 and np.all(errors[1:] < 1e-9)  # eps = 1 blurs the plan; then exact


# --------------------------------------------------------------------------- DM-Count


def _scaling_sinkhorn(a, b, cost, eps, iters):
    """Plain Sinkhorn-Knopp: P = diag(u) K diag(v), K = exp(-C / eps).

    Returns the plan and the potential of a in the convention P = a b exp((f + g - C) / eps),
    f = eps log(u / a) (the scaling form's eps log u is the potential of the cost regularised by
    -H(P) instead of KL(P | a b): it differs by eps log a, infinite on empty cells).
    """
    kernel = np.exp(-cost / eps)
    u, v = np.ones_like(a), np.ones_like(b)
    for _ in range(iters):
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
    return u[:, None] * kernel * v[None, :], eps * np.log(u / a)


def _dm_count_by_loops(pred, points, eps, iters, w_ot=0.1, w_tv=0.01):
    """Loss value and its gradient w.r.t. pred (the paper's OT gradient), with numpy."""
    losses, grads = [], []
    for density, heads in zip(pred[:, 0], points, strict=True):
        h, w = density.shape
        s, n = density.sum(), len(heads)
        loss, grad = abs(s - n), np.full((h, w), np.sign(s - n))
        if n:
            a = density.ravel() / s
            centres = np.array([_centre(i, j) for i in range(h) for j in range(w)])
            cost = ((centres[:, None] - heads[None]) ** 2).sum(-1)
            plan, f = _scaling_sinkhorn(a, np.full(n, 1.0 / n), cost, eps, iters)
            loss += w_ot * (plan * cost).sum()
            grad += w_ot * ((f - (a * f).sum()) / s).reshape(h, w)
            target = np.zeros((h, w))
            for x, y in heads:
                target[int(y // STRIDE), int(x // STRIDE)] += 1.0 / n
            diff = density / s - target
            loss += w_tv * n * np.abs(diff).sum()
            grad += w_tv * n * (np.sign(diff) / s - (np.sign(diff) * density).sum() / s**2)
        losses.append(loss)
        grads.append(grad[None])
    return np.mean(losses), np.stack(grads) / len(pred)


def test_dm_count_loss_and_gradient_against_numpy():
    pred, points = _case(seed=3, h=4, w=5, counts=(4, 0, 7))
    tp, tpts = _torch(pred, points)
    loss = dm_count_loss(tp, tpts, stride=STRIDE, eps=10.0, iters=3000)
    loss.backward()
    want, want_grad = _dm_count_by_loops(pred, points, eps=10.0, iters=3000)
    assert loss.item() == pytest.approx(want, rel=1e-8)
    np.testing.assert_allclose(tp.grad.numpy(), want_grad, rtol=1e-7, atol=1e-10)


def test_dm_count_ot_gradient_is_the_derivative_of_the_entropic_cost():
    """(f - <a, f>) / S is d OT_eps(pred / S, b) / d pred, OT_eps = <a, f> + <b, g> (finite differences)."""
    pred, points = _case(seed=4, h=3, w=3, counts=(4,))
    heads = torch.tensor(points[0])
    b = torch.full((4,), 0.25, dtype=torch.float64)
    from helpers.losses import _cell_centres

    centres = _cell_centres(3, 3, STRIDE, heads)
    cost = ((centres[:, None] - heads[None]) ** 2).sum(-1)

    def entropic(density):
        a = torch.tensor(density.ravel() / density.sum())
        _, f, g = sinkhorn(a, b, cost, 10.0, 3000)
        return float((a * f).sum() + (b * g).sum())

    density = pred[0, 0]
    tp = torch.tensor(pred, requires_grad=True)
    dm_count_loss(tp, [heads], eps=10.0, iters=3000, ot_weight=1.0, tv_weight=0.0).backward()
    ot_grad = tp.grad[0, 0].numpy() - np.sign(density.sum() - 4)  # minus the count term's
    step = 1e-6
    for i, j in [(0, 0), (1, 2), (2, 1)]:
        up, down = density.copy(), density.copy()
        up[i, j] += step
        down[i, j] -= step
        assert (entropic(up) - entropic(down)) / (2 * step) == pytest.approx(ot_grad[i, j], rel=1e-5, abs=1e-6)


def test_dm_count_zero_heads_and_zero_prediction():
    pred = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64, requires_grad=True)
    loss = dm_count_loss(pred, [torch.zeros(0, 2)])  # background only: the count term |8 - 0|
    assert loss.item() == pytest.approx(8.0)
    loss.backward()
    assert torch.allclose(pred.grad, torch.ones_like(pred))
    zero = torch.zeros((1, 1, 4, 4), dtype=torch.float64, requires_grad=True)
    loss = dm_count_loss(zero, [torch.tensor([[3.0, 5.0], [20.0, 9.0]])])  # only |0 - 2| is defined
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.isfinite(zero.grad).all()


def test_point_losses_in_float32_have_finite_gradients():
    pred, points = _case(seed=5, h=16, w=16, counts=(30, 1, 0))
    for loss_fn in (bayesian_loss, dm_count_loss):
        tp = torch.tensor(pred, dtype=torch.float32, requires_grad=True)
        loss = loss_fn(tp, [torch.tensor(p, dtype=torch.float32) for p in points])
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(tp.grad).all()


# --------------------------------------------------------------------------- the training pipeline


def test_train_step_with_a_point_loss_and_the_default_unchanged():
    """loss_fn gets relu(output) / scale; without it train_step is the MSE step as before."""
    from functools import partial

    from helpers.models import HeatmapCNN
    from helpers.train import density_loss, train_step

    torch.manual_seed(0)
    model = HeatmapCNN(width=4)
    images = torch.randn(2, 3, 32, 32)
    points = [torch.tensor([[3.0, 4.0], [20.0, 30.0]]), torch.zeros(0, 2)]
    with torch.no_grad():
        want = float(bayesian_loss(model(images) / 50.0, points, stride=8, sigma=4.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = train_step(model, images, points, opt, scale=50.0, loss_fn=partial(bayesian_loss, stride=8, sigma=4.0))
    assert got == pytest.approx(want, rel=1e-6)
    targets = torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        want = float(density_loss(model(images), targets, scale=50.0))
    assert train_step(model, images, targets, opt, scale=50.0) == pytest.approx(want, rel=1e-6)


def test_recipes_scale_the_point_loss_lengths_with_the_resolution(tmp_path):
    from helpers.tools.recipes import recommended_config
    from helpers.tools.trainer import TrainConfig

    cfg = recommended_config("heatmap_cnn", "B", tmp_path / "run", quick=False, loss="bayesian")
    assert cfg.loss == "bayesian" and cfg.resize == 0.5 and cfg.loss_kwargs == {"sigma": 4.0}
    cfg = recommended_config("heatmap_cnn", "A", tmp_path / "run", quick=False, loss="dm_count")
    assert cfg.loss_kwargs == {"eps": 2.5}  # 10 px^2 at full resolution, distances halved
    assert recommended_config("csrnet", "B", tmp_path / "run", quick=False).loss_kwargs == {}
    kept = recommended_config("heatmap_cnn", "B", tmp_path / "run", loss="bayesian", loss_kwargs={"sigma": 6})
    assert kept.loss_kwargs == {"sigma": 6}
    old = TrainConfig.from_dict({"loss": "sum", "scale": 1.0})  # a config.json from before --reduction
    assert (old.loss, old.reduction) == ("mse", "sum")


@pytest.mark.parametrize("loss", ["bayesian", "dm_count"])
def test_crowd_train_with_a_point_loss_lowers_the_loss(loss, tiny_training_env, tmp_path, capsys):
    """``crowd train --loss bayesian|dm_count`` on the tiny set: completes, the training loss falls."""
    from helpers.tools import cli
    from helpers.tools.trainer import read_history

    code = cli.main(["train", "--loss", loss, "--loss-arg", "sigma=4" if loss == "bayesian" else "eps=5",
                     "--model-arg", "width=8", "--batch-size", "2", "--crop", "64", "--device", "cpu",
                     "--epochs", "8", "--lr", "1e-2", "--warmup-epochs", "0", "--workers", "0",
                     "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = [row["train_loss"] for row in read_history(tmp_path / "run")]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < 0.8 * losses[0], losses  # epoch means of random crops: noisy
    assert math.isfinite(result["best_val_mae"])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.h5"))  # no density maps
