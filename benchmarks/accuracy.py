"""Accuracy within a wall-clock budget: HeatmapCNN from scratch, scored on the whole test split.

::

    python benchmarks/accuracy.py --part B --minutes 25 --threads 1 --fit-epochs   # runs/accuracy_B/
    python benchmarks/accuracy.py --part B --minutes 4 --set lr=5e-4 --out runs/acc_try
    python benchmarks/accuracy.py --part B --minutes 25 --threads 1 --fit-epochs --seeds 0 1 2   # OUT/seed_N
    python benchmarks/accuracy.py --summary runs/accuracy_B/seed_0 runs/accuracy_B/seed_1  # mean, spread

1. Trains HeatmapCNN from random init with :func:`helpers.tools.recipes.recommended_config` (full
   mode) and a hard budget ``max_minutes`` (:mod:`helpers.tools.trainer`). ``epochs`` is the recipe's
   unless ``--epochs`` is given; ``--fit-epochs`` sets it from a short speed measurement so that
   the cosine schedule ends inside the budget. A run that is cut by the budget validates the
   weights it reached (see :mod:`helpers.tools.trainer`).
2. The checkpoint is chosen on the validation split only (``best.pt``: lowest validation MAE).
3. That checkpoint counts every test image (whole images at the recipe's resolution) and the
   script prints MAE, RMSE and the bias (mean of predicted - true count) on val and on test,
   the steps, epochs and training images/s reached, and the MAE of the training-mean predictor
   (every image gets the mean count of the ``fit`` split) for reference.

The test split is never used to choose anything: compare settings by their validation MAE.
The last line printed is one JSON object with every number; it is also saved as
``OUT/accuracy.json``. Needs the real dataset (``CROWD_DATA``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from helpers import config as settings
from helpers.errors import CrowdError
from helpers.tools.trainer import key_value_arg

MODEL = "heatmap_cnn"
#: Fraction of the budget the planned epochs may fill (the rest absorbs load on a shared machine).
PLAN_FRACTION = 0.9
#: First-epoch cost of decoding, reading and resampling one image into the in-memory cache (s).
SETUP_S_PER_IMAGE = 0.4
RUN_FILES = ("last.pt", "best.pt", "history.csv", "config.json", "accuracy.json")




def measure_speed(cfg, steps: int = 8, heads: int = 0) -> dict[str, float]:
    """Seconds per training step (random crops of the configured size) and per validation image.

    Compute of the model and the loss on random inputs (a point loss gets ``heads`` random head
    points per crop): the in-memory cache makes data loading small next to it. The fastest of
    ``steps`` steps (and of two validation passes) is taken: another job that shares the CPU for
    a moment slows some steps down, never speeds one up.
    """
    import torch

    from helpers.models import build_model
    from helpers.tools.trainer import point_loss
    from helpers.train import train_step

    torch.manual_seed(0)
    model = build_model(cfg.model, **cfg.model_kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    x = torch.randn(cfg.batch_size, 3, cfg.crop, cfg.crop)
    loss_fn = point_loss(cfg)
    if loss_fn is None:
        y = torch.rand(cfg.batch_size, 1, cfg.crop // 8, cfg.crop // 8)
    else:
        y = [torch.rand(heads, 2) * cfg.crop for _ in range(cfg.batch_size)]
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        train_step(model, x, y, opt, scale=cfg.scale, reduction=cfg.reduction,
                   count_weight=cfg.count_loss_weight, grad_clip=cfg.grad_clip, loss_fn=loss_fn)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    model.eval()
    h, w = round(768 * cfg.resize), round(1024 * cfg.resize)
    val_times = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            model(torch.randn(1, 3, -(-h // 8) * 8, -(-w // 8) * 8))
            val_times.append(time.perf_counter() - t0)
    val_image = min(val_times)
    return {"step_s": min(times), "val_image_s": val_image}


def heads_per_crop(cfg, part: str, root: str, sample: int = 20) -> int:
    """Typical head points in one training crop: the fit split's mean count x the crop's share of
    a mean image at the recipe's resolution (sizes of ``sample`` images spread over the split)."""
    import numpy as np

    from helpers.data import list_records, read_image
    from helpers.samples import CrowdDataset

    records = list_records(part, "fit", root)
    counts = CrowdDataset(records, "eval")
    mean_count = float(np.mean([counts.true_count(i) for i in range(len(records))]))
    picks = np.linspace(0, len(records) - 1, min(sample, len(records))).round().astype(int)
    area = float(np.mean([np.prod(read_image(records[i].image_path).shape[:2]) for i in picks]))
    return max(1, round(mean_count * min(1.0, cfg.crop**2 / (area * cfg.resize**2))))


def count_errors(pred, true) -> dict[str, float]:
    """MAE, RMSE and bias (mean of pred - true) of two count arrays."""
    import numpy as np

    err = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "bias": float(err.mean())}


def predict_counts(model, scale: float, records, resize: float) -> list[float]:
    """Predicted count of each whole image at ``resize`` (no density target is made).

    The same input as :class:`helpers.samples.CrowdDataset` in eval mode (resized, ImageNet-
    normalised, padded at the bottom and right to a multiple of 8 with the mean colour), without
    reading or resampling the ground-truth density, which the count does not need.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from helpers.data import read_image
    from helpers.samples import normalize_image, resize_image, scaled_shape

    preds = []
    with torch.no_grad():
        for record in tqdm(records, desc="count", unit="img", leave=False):
            image = read_image(record.image_path)
            if resize != 1.0:
                image = resize_image(image, scaled_shape(image.shape[:2], resize))
            h, w = image.shape[:2]
            x = np.zeros((3, -(-h // 8) * 8, -(-w // 8) * 8), np.float32)
            x[:, :h, :w] = normalize_image(image)
            preds.append(float(model(torch.from_numpy(x)[None]).sum()) / scale)
    return preds


def evaluate_checkpoint(best: Path, part: str, split: str, root: str, cfg) -> dict[str, Any]:
    """Counts of every image of ``split`` by the checkpoint ``best`` (whole images, eval mode)."""
    from helpers.data import list_records
    from helpers.samples import CrowdDataset
    from helpers.tools.checkpoints import load_model

    model, info = load_model(best, device="cpu", expect_model=MODEL)
    records = list_records(part, split, root)
    truth = CrowdDataset(records, "eval")  # true_count: annotated heads after the point policy
    t0 = time.perf_counter()
    pred = predict_counts(model, info.scale, records, cfg.resize)
    out = count_errors(pred, [truth.true_count(i) for i in range(len(records))])
    out.update(images=len(records), seconds=time.perf_counter() - t0, epoch=info.epoch, step=info.step)
    return out


def mean_predictor_mae(part: str, root: str, split: str = "test") -> dict[str, float]:
    """MAE on ``split`` of predicting the ``fit`` split's mean count for every image."""
    import numpy as np

    from helpers.data import list_records
    from helpers.samples import CrowdDataset

    fit = CrowdDataset(list_records(part, "fit", root), "eval")
    mean = float(np.mean([fit.true_count(i) for i in range(len(fit))]))
    test = CrowdDataset(list_records(part, split, root), "eval")
    true = np.array([test.true_count(i) for i in range(len(test))], dtype=np.float64)
    return {"fit_mean_count": mean, "mae": float(np.abs(true - mean).mean())}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/accuracy.py",
        description="Train HeatmapCNN from scratch within a wall-clock budget, choose the checkpoint "
        "on validation, report test MAE / RMSE on every test image.",
    )
    p.add_argument("--part", default="B", help="ShanghaiTech part A or B (default B)")
    p.add_argument("--minutes", type=float, default=25.0, help="training budget in minutes (default 25)")
    p.add_argument("--out", help="run folder (default runs/accuracy_<part>)")
    p.add_argument("--epochs", type=int, help="planned epochs (default: the recipe's)")
    p.add_argument("--fit-epochs", action="store_true",
                   help="plan the epochs from a short speed test so that the schedule ends inside the budget "
                   "(unreliable on a busy machine)")
    p.add_argument("--set", action="append", type=key_value_arg, default=[], metavar="KEY=VALUE",
                   help="override a recipe setting (a helpers.tools.trainer.TrainConfig field, JSON value); repeatable")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in --out first")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate OUT/best.pt")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often "
                   "much faster on a machine shared with other jobs)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="train one run per seed, one after the other, in OUT/seed_<SEED>, then print the summary")
    p.add_argument("--summary", nargs="+", metavar="RUN",
                   help="no training: print each run's numbers (its accuracy.json) and their mean and spread")
    return p


def summarize(runs: list[Path]) -> dict[str, Any]:
    """Each run's validation and test numbers (from its ``accuracy.json``) and, over the runs, the
    mean, sample standard deviation and range of the validation and test MAE and of the test bias."""
    rows = []
    for run in runs:
        path = Path(run) / "accuracy.json"
        if not path.is_file():
            raise CrowdError(f"{path} is missing: {run} is not a finished run of benchmarks/accuracy.py.")
        r = json.loads(path.read_text(encoding="utf-8"))
        s = r.get("settings", {})
        loss = "mse" if s.get("loss", "mse") in ("mean", "sum") else s["loss"]  # runs before --reduction
        rows.append({"run": str(run), "part": r["part"], "seed": s.get("seed"), "loss": loss,
                     "epochs": f"{r.get('epochs_done')}/{r.get('epochs_planned')}", "best_epoch": r.get("best_epoch"),
                     **{k: r[k] for k in ("val_mae", "val_bias", "test_mae", "test_rmse", "test_bias")}})
        print(f"{run}: part {r['part']} seed {s.get('seed')} loss {loss}, epochs "
              f"{rows[-1]['epochs']} (best {r.get('best_epoch')}): val MAE {r['val_mae']:.2f} "
              f"(bias {r['val_bias']:+.2f}), test MAE {r['test_mae']:.2f} RMSE {r['test_rmse']:.2f} "
              f"(bias {r['test_bias']:+.2f})")
    out: dict[str, Any] = {"runs": rows}
    for key in ("val_mae", "test_mae", "test_bias"):
        values = [row[key] for row in rows]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values)}
        print(f"{key}: mean {out[key]['mean']:.2f}, standard deviation {out[key]['std']:.2f}, "
              f"range {out[key]['min']:.2f} to {out[key]['max']:.2f} over {len(values)} runs")
    print(json.dumps(out))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from helpers.data import resolve_data_source
    from helpers.tools.fileio import write_json_atomic
    from helpers.tools.recipes import epochs_for_budget, recommended_config
    from helpers.tools.trainer import TrainConfig, train

    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise CrowdError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    source = resolve_data_source()
    if source.synthetic:
        raise CrowdError("benchmarks/accuracy.py needs the real ShanghaiTech set: set CROWD_DATA to its root.")
    root = str(source.root)
    part = str(args.part).upper()
    if not args.minutes > 0:
        raise CrowdError(f"--minutes must be positive, got {args.minutes}")
    out = Path(args.out) if args.out else settings.runs_root() / f"accuracy_{part}"
    overrides = dict(args.set)
    import torch

    result: dict[str, Any] = {"part": part, "model": MODEL, "minutes": args.minutes, "out": str(out),
                              "threads": torch.get_num_threads()}

    if args.eval_only:
        if not (out / "config.json").is_file():
            raise CrowdError(f"{out} holds no training run (no config.json); train it first.")
        cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    else:
        if args.overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        elif (out / "last.pt").exists():
            raise CrowdError(f"{out} already holds a run: pass --overwrite or choose another --out.")
        cfg = recommended_config(MODEL, part, out, quick=False, data_root=root, max_minutes=args.minutes,
                                 **overrides).resolved()
        from helpers.data import list_records

        n_fit = len(list_records(part, "fit", root)) if cfg.max_fit is None else cfg.max_fit
        n_val = len(list_records(part, "val", root)) if cfg.max_val is None else cfg.max_val
        if args.epochs is None and args.fit_epochs:
            speed = measure_speed(cfg, heads=heads_per_crop(cfg, part, root) if cfg.loss != "mse" else 0)
            # Compute of the model on random crops, plus the first epoch's loading of every image;
            # each validation also passes the recalibration images (twice with the count gain).
            whole_images = n_val + cfg.bn_recalibrate * (2 if cfg.count_calibration else 1)
            epochs = epochs_for_budget(n_fit, cfg.batch_size, PLAN_FRACTION * args.minutes,
                                       1.0 / speed["step_s"], whole_images * speed["val_image_s"] * 1.3,
                                       setup_seconds=SETUP_S_PER_IMAGE * (n_fit + n_val))
            result["speed_test"] = speed
        else:
            epochs = args.epochs or cfg.epochs
        cfg.epochs = epochs
        print(f"training {MODEL} on part {part} for at most {args.minutes:g} min, {epochs} planned epochs: "
              + json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("data_root", "out")}), flush=True)
        t0 = time.perf_counter()
        res = train(cfg)
        wall = time.perf_counter() - t0
        done_epochs = len(res.history)
        partial = (res.time_stop or {}).get("batch_in_epoch", 0)
        images = done_epochs * n_fit + partial * cfg.batch_size
        epoch_rates = [n_fit / r["seconds"] for r in res.history[1:] if r["seconds"] > 0]
        result.update(
            epochs_planned=epochs, epochs_done=done_epochs, partial_batches=partial,
            steps=(res.time_stop or {}).get("step", res.history[-1]["step"] if res.history else 0),
            train_seconds=wall, train_images=images, train_images_per_s=images / wall,
            epoch_images_per_s_median=statistics.median(epoch_rates) if epoch_rates else math.nan,
            stop_reason=res.stop_reason, best_epoch=res.best_epoch, best_val_mae_during_training=res.best_val_mae,
            val_curve=[round(r["val_mae"], 2) for r in res.history],
        )
    result["settings"] = {k: v for k, v in cfg.to_dict().items() if k not in ("data_root", "out", "resume")}
    best = out / "best.pt"
    if not best.is_file():
        raise CrowdError(f"{best} does not exist: training produced no validated checkpoint.")
    val = evaluate_checkpoint(best, part, "val", root, cfg)
    print(f"val  ({val['images']} images, checkpoint epoch {val['epoch']}): MAE {val['mae']:.2f}  "
          f"RMSE {val['rmse']:.2f}  bias {val['bias']:+.2f}", flush=True)
    test = evaluate_checkpoint(best, part, "test", root, cfg)
    reference = mean_predictor_mae(part, root)
    result.update(val_mae=val["mae"], val_rmse=val["rmse"], val_bias=val["bias"], test_mae=test["mae"],
                  test_rmse=test["rmse"], test_bias=test["bias"], test_images=test["images"],
                  checkpoint_epoch=test["epoch"], checkpoint_step=test["step"],
                  mean_predictor_test_mae=reference["mae"], fit_mean_count=reference["fit_mean_count"])
    if not args.eval_only:
        print(f"training: {result['steps']} steps, {result['epochs_done']} epochs"
              + (f" + {result['partial_batches']} batches" if result["partial_batches"] else "")
              + f" in {result['train_seconds'] / 60:.1f} min ({result['stop_reason']}), "
              f"{result['train_images_per_s']:.1f} training images/s overall, "
              f"{result['epoch_images_per_s_median']:.1f} per epoch (median, validation included)")
    print(f"test ({test['images']} images): MAE {test['mae']:.2f}  RMSE {test['rmse']:.2f}  bias {test['bias']:+.2f}")
    print(f"reference: predicting the fit mean ({reference['fit_mean_count']:.1f}) for every test image: "
          f"MAE {reference['mae']:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "accuracy.json", result)
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.summary:
            summarize([Path(r) for r in args.summary])
        elif args.seeds:
            base = Path(args.out) if args.out else settings.runs_root() / f"accuracy_{str(args.part).upper()}"
            for seed in args.seeds:
                run(argparse.Namespace(**{**vars(args), "out": str(base / f"seed_{seed}"),
                                          "set": [*args.set, ("seed", seed)]}))
            summarize([base / f"seed_{seed}" for seed in args.seeds])
        else:
            run(args)
    except CrowdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
