"""Inference speed on a CPU: plain float32 against the fast path, and what it costs in counts.

::

    python benchmarks/inference.py                       # both models, 2 threads
    python benchmarks/inference.py --csrnet-checkpoint runs/csrnet_B/best.pt --limit 50

For CSRNet and HeatmapCNN it prints:

1. **Speed** on one 1024 x 768 image (a Part B test photo, or noise without the dataset):
   images/s of plain eager float32 (``model.eval()``, ``torch.no_grad()``, NCHW) and of the fast
   path :func:`helpers.tools.fast_inference.prepare_fast_cpu` (``inference_mode``, BatchNorm folded,
   ``channels_last``, int8 where the CPU has fast int8, calibrated on ``--calibration`` training
   images), and the ratio. The median of ``--repeats`` runs after one warm-up run.
2. **Counts**: the mean relative difference ``|fast - float32| / float32`` over the Part B test
   images (all 316 unless ``--limit``), each at the resolution the checkpoint was trained at, and
   the MAE of both against the annotations.
3. **Memory**: the peak resident memory (``ru_maxrss`` of a fresh process that imports torch,
   builds the model and counts one photo) of ``helpers.tools.inference.count_image`` on a 4000 x 3000 photo at
   full resolution, tiled automatically, float32 and fast.

Weights: ``--heatmap-checkpoint`` (default ``runs/accuracy_B/best.pt`` when it exists) and
``--csrnet-checkpoint`` (default ``runs/csrnet_B/best.pt`` when it exists); without one the model
has random weights, which the output says: speed is then meaningful, count differences are not.
No timed assertion: the figures depend on the machine and its load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINTS = {"heatmap_cnn": "runs/accuracy_B/best.pt", "csrnet": "runs/csrnet_B/best.pt"}
SPEED_SHAPE = (768, 1024)  # H, W of the speed test
MEMORY_SHAPE = (3000, 4000)  # H, W of the memory test


def load(model_name: str, checkpoint: str | None):
    """``(model, scale, input_scale, label)``: the checkpoint's weights, or random ones."""
    import torch

    from helpers.models import build_model
    from helpers.tools.checkpoints import load_model

    if checkpoint and Path(checkpoint).is_file():
        model, info = load_model(checkpoint, "cpu", expect_model=model_name)
        return model.eval(), float(info.scale), float(info.input_scale), f"{checkpoint} (epoch {info.epoch})"
    torch.manual_seed(0)
    kwargs = {"pretrained": None} if model_name == "csrnet" else {"width": 16, "init_output": 3.0}
    return build_model(model_name, **kwargs).eval(), 100.0, 0.5, "RANDOM weights (no checkpoint)"


def images_per_second(fn, x, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        fn(x)  # warm-up: allocations, oneDNN kernel selection
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def speed_image(records) -> np.ndarray:
    from helpers.data import read_image
    from helpers.samples import resize_image

    if records:
        image = read_image(records[0].image_path)
        if image.shape[:2] != SPEED_SHAPE:
            image = resize_image(image, SPEED_SHAPE)
        return image
    return np.random.default_rng(0).integers(0, 256, (*SPEED_SHAPE, 3), dtype=np.uint8)


def count_differences(model, fast, records, input_scale: float, scale: float) -> dict[str, float]:
    """Counts of every test record, float32 and fast; mean relative difference and MAEs."""
    import torch
    from tqdm.auto import tqdm

    from helpers.data import load_example
    from helpers.samples import normalize_image, resize_image, scaled_shape

    rel, err_plain, err_fast = [], [], []
    with torch.inference_mode():
        for record in tqdm(records, desc="test images", unit="img", leave=False):
            example = load_example(record)
            image = example.image
            if input_scale != 1.0:
                image = resize_image(image, scaled_shape(image.shape[:2], input_scale))
            pad_h, pad_w = -image.shape[0] % 8, -image.shape[1] % 8
            x = torch.from_numpy(normalize_image(image))[None]
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))
            plain = model(x).sum().item() / scale
            quick = fast(x.contiguous(memory_format=torch.channels_last)).sum().item() / scale
            rel.append(abs(quick - plain) / max(abs(plain), 1e-6))
            err_plain.append(abs(plain - len(example.points)))
            err_fast.append(abs(quick - len(example.points)))
    return {"images": len(rel), "mean_rel_diff": float(np.mean(rel)), "max_rel_diff": float(np.max(rel)),
            "mae_float32": float(np.mean(err_plain)), "mae_fast": float(np.mean(err_fast))}


def memory_child(model_name: str, checkpoint: str | None, fast: bool, threads: int) -> None:
    """Run in a fresh process: count a 4000 x 3000 photo, print the peak RSS in MiB as JSON."""
    import resource

    import torch

    from helpers.tools.inference import count_image

    torch.set_num_threads(threads)
    model, scale, _, _ = load(model_name, checkpoint)
    photo = np.random.default_rng(0).integers(0, 256, (*MEMORY_SHAPE, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    pred = count_image(photo, model, scale=scale, input_scale=1.0, fast=fast)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak, "tiles": pred.n_tiles, "seconds": seconds}))


def peak_memory(model_name: str, checkpoint: str | None, fast: bool, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", model_name,
           "--threads", str(threads)] + (["--fast"] if fast else [])
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(model_name: str, checkpoint: str | None, args, test_records, fit_root) -> dict[str, Any]:
    import torch

    from helpers.samples import normalize_image
    from helpers.tools.fast_inference import (
        calibration_tensors,
        has_fast_int8,
        prepare_fast_cpu,
        training_calibration,
    )

    model, scale, input_scale, label = load(model_name, checkpoint)
    print(f"\n== {model_name}: {label}", flush=True)
    calibration = None
    if has_fast_int8():
        try:
            images = training_calibration("B", args.calibration, input_scale, fit_root)
            calibration = calibration_tensors(images)
            source = f"{len(images)} Part B training images"
        except Exception as exc:  # no dataset: calibrate on noise, and say so
            calibration = [torch.randn(1, 3, 384, 512) for _ in range(args.calibration)]
            source = f"random noise ({type(exc).__name__}: no training images)"
        print(f"int8 calibration: {source}", flush=True)
    t0 = time.perf_counter()
    fast = prepare_fast_cpu(model, calibration)
    prep_s = time.perf_counter() - t0

    x = torch.from_numpy(normalize_image(speed_image(test_records)))[None]
    plain_ips = images_per_second(model, x, args.repeats)
    fast_ips = images_per_second(fast, x.contiguous(memory_format=torch.channels_last), args.repeats)
    row: dict[str, Any] = {"model": model_name, "weights": label, "fast_kind": fast.fast_kind,
                           "prepare_s": prep_s, "plain_images_per_s": plain_ips,
                           "fast_images_per_s": fast_ips, "speedup": fast_ips / plain_ips}
    print(f"speed on {SPEED_SHAPE[1]}x{SPEED_SHAPE[0]}: plain float32 {plain_ips:.2f} img/s, fast "
          f"({fast.fast_kind}) {fast_ips:.2f} img/s: {fast_ips / plain_ips:.1f}x "
          f"(preparing the fast model took {prep_s:.1f} s)", flush=True)
    if test_records:
        diff = count_differences(model, fast, test_records, input_scale, scale)
        row["counts"] = diff
        print(f"counts on {diff['images']} Part B test images (at {input_scale:g}x): mean |fast - float32| / "
              f"float32 = {100 * diff['mean_rel_diff']:.2f}% (max {100 * diff['max_rel_diff']:.2f}%); "
              f"MAE float32 {diff['mae_float32']:.2f}, fast {diff['mae_fast']:.2f}"
              + ("  [random weights: not meaningful]" if "RANDOM" in label else ""), flush=True)
    if not args.no_memory:
        ckpt = checkpoint if checkpoint and Path(checkpoint).is_file() else None
        for kind, flag in (("float32", False), ("fast", True)):
            mem = peak_memory(model_name, ckpt, flag, args.threads)
            row[f"memory_{kind}"] = mem
            if "error" in mem:
                print(f"memory, {kind}: failed: {mem['error']}", flush=True)
            else:
                print(f"peak memory counting a {MEMORY_SHAPE[1]}x{MEMORY_SHAPE[0]} photo at full resolution, "
                      f"{kind}: {mem['peak_mib']:.0f} MiB ({mem['tiles']} tiles, {mem['seconds']:.1f} s)",
                      flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["csrnet", "heatmap_cnn"], choices=["csrnet", "heatmap_cnn"])
    p.add_argument("--heatmap-checkpoint", default=DEFAULT_CHECKPOINTS["heatmap_cnn"])
    p.add_argument("--csrnet-checkpoint", default=DEFAULT_CHECKPOINTS["csrnet"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path (median)")
    p.add_argument("--limit", type=int, help="at most this many test images for the counts (default: all)")
    p.add_argument("--calibration", type=int, default=8, help="training images to calibrate int8 on")
    p.add_argument("--no-memory", action="store_true", help="skip the 4000x3000 memory test")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.checkpoint, args.fast, args.threads)
        return 0

    from helpers.data import list_records, resolve_data_source, take_evenly
    from helpers.tools.fast_inference import has_fast_int8

    source = resolve_data_source()
    root = str(source.root)
    try:
        test_records = take_evenly(list_records("B", "test", root), args.limit)
    except Exception:
        test_records = []
    if "ShanghaiTech" not in root and not test_records:
        print("note: no ShanghaiTech test images: speed only", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fast int8 on this CPU: "
          f"{has_fast_int8()}, load average {os.getloadavg()[0]:.2f}, data {root}", flush=True)
    checkpoints = {"csrnet": args.csrnet_checkpoint, "heatmap_cnn": args.heatmap_checkpoint}
    rows = [bench(name, checkpoints[name], args, test_records, root) for name in args.models]
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print(json.dumps({"threads": args.threads, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
