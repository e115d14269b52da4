"""How much a trained HeatmapCNN's whole-image counts depend on its BatchNorm statistics.

::

    python benchmarks/bn_statistics.py runs/accuracy_B            # a run folder of benchmarks/accuracy.py
    python benchmarks/bn_statistics.py runs/accuracy_A --images 32

The same weights (the run's ``best.pt``, and the weight average and raw weights of its ``last.pt``)
count the validation images with four estimates of the BatchNorm statistics:

* ``stored``: what the checkpoint holds (running averages over training crops, or for ``best.pt``
  the recalibrated statistics it was saved with);
* ``per-image``: :func:`helpers.tools.trainer.recalibrate_batchnorm` on ``--images`` whole fit
  images (the average of each image's own statistics, what the trainer's ``bn_recalibrate`` does);
* ``pooled``: the mean and variance of each layer's input over all pixels of those images together;
* ``crops``: the average over 100 batches of 4 random training crops, as the network saw in training.

For each it prints the validation MAE, RMSE and bias (mean predicted - true people), and then the
same after multiplying every count by the gain ``sum(true) / sum(pred)`` fitted on ``--images``
fit images (:func:`helpers.tools.trainer.count_gain`, the trainer's ``count_calibration``).
Validation split only; needs the real dataset (``CROWD_DATA``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch


def pooled_statistics(model, images):
    """A copy of ``model`` whose BatchNorm layers hold the mean and variance of their input over
    every pixel of ``images`` together, set layer by layer in forward order."""
    fresh = copy.deepcopy(model).eval()
    for bn in [m for m in fresh.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        seen = []
        hook = bn.register_forward_pre_hook(lambda _m, inputs, seen=seen: seen.append(inputs[0].detach().double()))
        n, total, squares = 0, 0.0, 0.0
        with torch.no_grad():
            for x in images:
                seen.clear()
                fresh(x)
                a = seen[0]
                n += a.shape[0] * a.shape[2] * a.shape[3]
                total, squares = total + a.sum((0, 2, 3)), squares + (a * a).sum((0, 2, 3))
        hook.remove()
        mean = total / n
        bn.running_mean.copy_(mean.float())
        bn.running_var.copy_((squares / n - mean * mean).float())
    return fresh


def crop_statistics(model, train_set, batches: int = 100, batch_size: int = 4):
    """A copy of ``model`` whose BatchNorm statistics average ``batches`` batches of training crops
    (:func:`helpers.tools.trainer.recalibrate_batchnorm`, fed batches instead of whole images)."""
    from helpers.tools.trainer import recalibrate_batchnorm

    g = torch.Generator().manual_seed(0)
    picks = (torch.randint(len(train_set), (batch_size,), generator=g).tolist() for _ in range(batches))
    return recalibrate_batchnorm(model, (torch.stack([train_set[i][0] for i in p]) for p in picks))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run folder with best.pt and last.pt")
    p.add_argument("--images", type=int, default=64, help="whole fit images for the statistics and the gain")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from helpers.data import list_records, take_evenly
    from helpers.density import DensityParams
    from helpers.models import build_model
    from helpers.samples import CrowdDataset
    from helpers.tools.checkpoints import load_checkpoint
    from helpers.tools.trainer import count_gain, recalibrate_batchnorm
    from helpers.train import evaluate_counts

    run = Path(args.run)
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    cfg = last["config"]
    common = {"density_params": DensityParams(method=cfg["density_method"], sigma=cfg["density_sigma"]),
              "resize": cfg["resize"]}
    fit = list_records(cfg["part"], "fit", cfg.get("data_root"))
    val_set = CrowdDataset(list_records(cfg["part"], "val", cfg.get("data_root")), "eval", **common)
    fit_set = CrowdDataset(take_evenly(fit, args.images), "eval", **common)
    train_set = CrowdDataset(fit, "train", crop=cfg["crop"], flip=cfg["flip"], rescale=cfg["rescale"], seed=5,
                             cache_in_memory=True, **common)
    fit_images = [fit_set[i][0][None] for i in range(len(fit_set))]
    scale = float(last["scale"])

    def build(state):
        model = build_model(last["model_name"], **last["model_kwargs"])
        model.load_state_dict(state)
        return model.eval()

    weights = {"best.pt": best["model"], "last.pt average": last.get("ema") or last["model"], "last.pt raw": last["model"]}
    rows = []
    for label, state in weights.items():
        model = build(state)
        variants = {"stored": model, "per-image": recalibrate_batchnorm(model, fit_images),
                    "pooled": pooled_statistics(model, fit_images), "crops": crop_statistics(model, train_set)}
        for stats, net in variants.items():
            gain = count_gain(evaluate_counts(net, fit_set, scale=scale, device="cpu"))
            for calibrated in (False, True):
                out = evaluate_counts(net, val_set, scale=scale / (gain if calibrated else 1.0), device="cpu")
                row = {"weights": label, "statistics": stats, "gain": round(gain if calibrated else 1.0, 4),
                       **{k: round(out[k], 2) for k in ("mae", "rmse", "bias")}}
                rows.append(row)
                print(f"{label:16s} {stats:9s} gain {row['gain']:6.3f}: val MAE {row['mae']:7.2f}  "
                      f"RMSE {row['rmse']:7.2f}  bias {row['bias']:+8.2f}", flush=True)
    print(json.dumps({"run": str(run), "part": cfg["part"], "val_images": len(val_set), "fit_images": len(fit_set),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
