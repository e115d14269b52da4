"""Losses that learn from the head points directly, without a Gaussian ground truth: the Bayesian
loss (Ma et al., ICCV 2019, with Bayesian+'s background) and DM-Count (Wang et al., NeurIPS 2020).

Both take ``pred`` in people per output cell (the model output / the training scale) and each
sample's head points (x, y) in its input pixels; output cell (i, j) is centred at
``(stride * (j + 0.5), stride * (i + 0.5))``. The maths and the defaults: docs/training.md.
"""

from __future__ import annotations

import torch


def _cell_centres(h: int, w: int, stride: int, like: torch.Tensor) -> torch.Tensor:
    """(h * w, 2) input-pixel (x, y) centres of the output cells, row-major, dtype of ``like``."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=like.dtype, device=like.device),
                            torch.arange(w, dtype=like.dtype, device=like.device), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).add(0.5).mul(stride)


def bayesian_loss(pred, points, stride=8, sigma=8.0, background=1.0):
    """Bayesian loss: the expected count of every head (its posterior-weighted density) is 1.

    p(n | m) = N(x_m; z_n, sigma^2) / sum_k N(x_m; z_k, sigma^2) (equal priors); Bayesian+ adds for
    each cell a background pseudo-point at distance d - min_n |x_m - z_n|, expected count 0.
    loss_b = sum_n |1 - sum_m p(n | m) pred_m| + |sum_m p(bg | m) pred_m|; no heads: |sum pred|.

    Inputs:
    - pred: float tensor (B, 1, h, w), predicted people per output cell (>= 0)
    - points: list of B float tensors (N_b, 2), head (x, y) in input pixels of each sample
    - stride: int, input pixels per output cell
    - sigma: float, likelihood standard deviation in input pixels (the paper: 8)
    - background: float, d / the input's shorter side min(h, w) * stride (code: 1.0); 0 = no background
    Returns:
    - loss: scalar tensor, mean over the B samples (people)
    """
    b, _, h, w = pred.shape
    centres = _cell_centres(h, w, stride, pred)
    total = pred.new_zeros(())
    for density, heads in zip(pred.reshape(b, -1), points, strict=True):
        if len(heads) == 0:
            total = total + density.sum().abs()
            continue
        dist2 = torch.cdist(heads.to(pred), centres, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (N, h * w)
        if background > 0:
            d = background * min(h, w) * stride
            dist2 = torch.cat([dist2, (d - dist2.min(0, keepdim=True).values.sqrt()) ** 2])
        posterior = torch.softmax(-dist2 / (2.0 * sigma**2), dim=0)
        expected = posterior @ density  # (N,), then the background's when there is one
        total = total + (1.0 - expected[: len(heads)]).abs().sum() + expected[len(heads) :].abs().sum()
    return total / b


def sinkhorn(a, b, cost, eps, iters=100, absorb=1e15):
    """Entropic optimal transport between histograms a and b: Sinkhorn's matrix scaling, stabilised.

    Alternates v = b / (K^T u), u = a / (K v) with K_mn = exp((alpha_m + beta_n - C_mn) / eps);
    when u or v leaves [1 / absorb, absorb] it moves into the potentials (alpha += eps log u,
    beta += eps log v, K recomputed), so an eps far below the costs neither over- nor underflows.

    Inputs:
    - a: float tensor (M,) >= 0, sum 1; b: float tensor (N,) >= 0, sum 1
    - cost: float tensor (M, N), C_mn the cost of moving unit mass from m to n
    - eps: float > 0, entropic regularisation (units of cost); iters: int; absorb: float > 1
    Returns:
    - plan: tensor (M, N), P_mn = a_m b_n exp((f_m + g_n - C_mn) / eps), rows sum to a exactly
    - f: tensor (M,), g: tensor (N,), the potentials (units of cost) of the cost regularised by
      KL(P | a b); f is the gradient of the entropic cost w.r.t. a, up to a constant
    """
    cost, rows, cols = cost.to(a.dtype), a > 0, b > 0
    c = cost[rows][:, cols]  # the cells and heads that hold mass
    alpha = c.min(dim=1).values  # c-transforms: every row and column of K then holds a 1
    beta = (c - alpha[:, None]).min(dim=0).values
    u, v = torch.ones_like(alpha), torch.ones_like(beta)
    for i in range(iters):
        if i == 0 or max(u.max(), v.max()) > absorb or min(u.min(), v.min()) < 1 / absorb:
            alpha, beta = alpha + eps * u.log(), beta + eps * v.log()  # the first K, or absorb u, v
            u, v = torch.ones_like(u), torch.ones_like(v)
            kernel = torch.exp((alpha[:, None] + beta[None, :] - c) / eps)
        v = b[cols] / (kernel.T @ u)
        u = a[rows] / (kernel @ v)
    log_a, log_b, g = a.log(), b.log(), torch.zeros_like(b)
    g[cols] = beta + eps * (v.log() - log_b[cols])
    f = -eps * torch.logsumexp(log_b[None, :] + (g[None, :] - cost) / eps, dim=1)  # rows exact
    if not cols.all():  # empty columns: their potential is the next half-step
        g_next = -eps * torch.logsumexp(log_a[:, None] + (f[:, None] - cost) / eps, dim=0)
        g = torch.where(cols, g, g_next)
    plan = torch.exp(log_a[:, None] + log_b[None, :] + (f[:, None] + g[None, :] - cost) / eps)
    return plan, f, g


def dm_count_loss(pred, points, stride=8, ot_weight=0.1, tv_weight=0.01, eps=10.0, iters=100):
    """DM-Count: count term + ot_weight x OT term + tv_weight x N x TV term, mean over samples.

    S = sum pred, a = pred / S: count = |S - N|; OT = <P, C>, P the Sinkhorn plan from a to 1/N on
    each head, C the squared cell-to-head distance (pixels^2), its gradient (f - <a, f>) / S from the
    potential f as in the paper; TV = sum_m |a_m - t_m|, t = heads per cell / N (no 1/2, as the code).

    Inputs:
    - pred: float tensor (B, 1, h, w), predicted people per output cell (>= 0)
    - points: list of B float tensors (N_b, 2), head (x, y) in input pixels of each sample
    - stride: int, input pixels per output cell
    - ot_weight, tv_weight: floats, the paper's 0.1 and 0.01
    - eps: float, Sinkhorn regularisation in pixels^2 (paper: 10); iters: int (paper: 100)
    Returns:
    - loss: scalar tensor (the OT term's value is the transport cost, its gradient the paper's)
    """
    b, _, h, w = pred.shape
    centres = _cell_centres(h, w, stride, pred)
    total = pred.new_zeros(())
    for density, heads in zip(pred.reshape(b, -1), points, strict=True):
        heads = heads.to(pred)
        n, mass = len(heads), density.sum()
        total = total + (mass - n).abs()
        if n == 0 or float(mass.detach()) <= 0:
            continue
        a = density / mass
        cost = torch.cdist(centres, heads, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (h * w, N)
        with torch.no_grad():
            plan, f, _ = sinkhorn(a.detach(), torch.full_like(heads[:, 0], 1.0 / n), cost, eps, iters)
            grad = (f - (a * f).sum()) / mass
        surrogate = (density * grad).sum()
        total = total + ot_weight * (surrogate + ((plan * cost).sum() - surrogate).detach())
        cells = (heads / stride).floor().long()
        col, row = cells[:, 0].clamp(0, w - 1), cells[:, 1].clamp(0, h - 1)
        target = torch.zeros_like(a).index_add_(0, row * w + col, torch.full_like(heads[:, 0], 1.0 / n))
        total = total + tv_weight * n * (a - target).abs().sum()
    return total / b
