"""What each training loss costs per step, next to the network's own step.

::

    python benchmarks/losses.py                       # Part B recipe sizes, 1 thread
    python benchmarks/losses.py --heads 300 --repeats 5

At the sizes of the HeatmapCNN Part B recipe (batches of 4 crops of 384 x 384 pixels at half
resolution, so 48 x 48 output cells), it times

* **network step**: :func:`helpers.train.train_step` with the pixel MSE (forward, backward, Adam);
* **loss only**: forward and backward of each loss on a fixed prediction: ``mse``
  (:func:`helpers.train.density_loss`), ``bayesian`` and ``dm_count`` (:mod:`helpers.losses`, with
  the recipe's sigma and eps, :func:`helpers.tools.recipes.point_loss_kwargs`).

Heads are placed uniformly at random, ``--heads`` per crop (default 90: Part B has 123 people per
image on average, and a 384-pixel crop of a half-resolution image holds 3/4 of it). The fastest of
``--repeats`` runs is printed (another job sharing the CPU only slows runs down). The last line is
one JSON object with every number. No dataset is needed.
"""

from __future__ import annotations

import argparse
import json
import time

from package_model import cpu_model  # benchmarks/ is on the path when a script runs


def fastest(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn()`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="B", choices=["A", "B"], help="recipe whose sizes are used")
    parser.add_argument("--heads", type=int, default=90, help="head points per crop")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (the fastest is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)

    import torch

    from helpers import losses
    from helpers.models import build_model
    from helpers.tools import recipes
    from helpers.train import density_loss, train_step

    torch.set_num_threads(args.threads)
    cfg = recipes.recommended_config("heatmap_cnn", args.part, "runs/unused", quick=False)
    side, batch, stride = cfg.crop, cfg.batch_size, 8
    torch.manual_seed(0)
    model = build_model("heatmap_cnn", **cfg.model_kwargs).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, side, side)
    cells = side // stride
    target = torch.rand(batch, 1, cells, cells) * 0.05
    points = [torch.rand(args.heads, 2) * side for _ in range(batch)]
    pred = (torch.rand(batch, 1, cells, cells) * 0.05).requires_grad_()

    def backward(loss):
        pred.grad = None
        loss.backward()

    results = {"network step (MSE)": fastest(lambda: train_step(model, images, target, optimizer,
                                                                  scale=cfg.scale), args.repeats)}
    point_kwargs = {name: recipes.point_loss_kwargs(name, cfg.resize) for name in ("bayesian", "dm_count")}
    results["loss only: mse"] = fastest(lambda: backward(density_loss(pred, target)), args.repeats)
    results["loss only: bayesian"] = fastest(lambda: backward(losses.bayesian_loss(
        pred, points, stride, **point_kwargs["bayesian"])), args.repeats)
    results["loss only: dm_count"] = fastest(lambda: backward(losses.dm_count_loss(
        pred, points, stride, **point_kwargs["dm_count"])), args.repeats)
    print(f"Part {args.part} recipe sizes: batches of {batch} crops of {side} px ({cells} x {cells} cells), "
          f"{args.heads} heads per crop, {args.threads} thread(s), {cpu_model()}")
    for name, seconds in results.items():
        print(f"  {name:22s} {seconds * 1000:9.1f} ms per batch")
    print(json.dumps({"cpu": cpu_model(), "part": args.part, "heads": args.heads, "threads": args.threads, "batch": batch,
                      "crop": side, "seconds_per_batch": results, "point_loss_kwargs": point_kwargs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
