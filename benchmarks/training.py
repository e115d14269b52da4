"""Training speed on this machine: the project's data pipeline against a plain one.

::

    python benchmarks/training.py --part B                  # both models, a few minutes on 2 cores
    python benchmarks/training.py --model heatmap_cnn --steps 20

For each model it measures, at a stated crop size and resolution,

* **ours**: :class:`helpers.samples.CrowdDataset` with the in-memory cache (images decoded,
  resized and their densities read once), batches and workers as
  :func:`helpers.tools.recipes.recommended_config` sets them, Adam steps with :func:`helpers.train.train_step`;
* **plain**: what the original CSRNet code does for every sample: decode the JPEG with PIL, read
  the density from its HDF5 file with h5py (the project's cache files), resize both when the
  recipe trains at reduced resolution, random crop and flip, normalise, sum-pool the target to
  the output stride, and take one optimiser step per sample (batch size 1);

and prints, per pipeline, the training samples/s, the images/s of the data pipeline alone (no
model), and the ratio ours / plain. The first fill of the in-memory cache is timed separately
(it is paid once per run). Both pipelines make the same number of samples. CSRNet's frontend
starts from random init here (speed does not depend on the weights). Uses the real dataset
(``CROWD_DATA``); the density cache is built for the chosen images first if needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from helpers.errors import CrowdError

MODELS = ("heatmap_cnn", "csrnet")
#: Default optimiser steps of the cached pipeline per model (the plain one makes as many samples).
DEFAULT_STEPS = {"heatmap_cnn": 12, "csrnet": 3}
#: Default resolution per model: CSRNet at full resolution, HeatmapCNN at its recipe's.
DEFAULT_RESIZE = {"csrnet": 1.0}


class PlainSamples:
    """The original CSRNet way: decode and read everything again for every sample (batch size 1)."""

    def __init__(self, records, crop: int, resize: float, density_params, seed: int = 0) -> None:
        from helpers.tools.cache import cache_path

        self.records = list(records)
        self.h5_paths = [cache_path(r, density_params) for r in self.records]
        self.crop, self.resize = int(crop), float(resize)
        self.rng = np.random.default_rng(seed)

    def sample(self, index: int):
        """``(image (1, 3, c, c), target (1, 1, c/8, c/8))`` float32 tensors for one record."""
        import h5py
        import torch
        from PIL import Image

        from helpers.density import downsample_density
        from helpers.samples import normalize_image, resample_density, resize_image, scaled_shape

        record = self.records[index]
        with Image.open(record.image_path) as im:
            image = np.asarray(im.convert("RGB"))
        with h5py.File(self.h5_paths[index], "r") as fh:
            density = np.asarray(fh["density"], dtype=np.float32)
        if self.resize != 1.0:
            shape = scaled_shape(image.shape[:2], self.resize)
            image, density = resize_image(image, shape), resample_density(density, shape)
        c = self.crop
        h, w = density.shape
        top = int(self.rng.integers(0, max(1, h - c + 1)))
        left = int(self.rng.integers(0, max(1, w - c + 1)))
        img = image[top : top + c, left : left + c]
        den = density[top : top + c, left : left + c]
        if self.rng.random() < 0.5:
            img, den = img[:, ::-1], den[:, ::-1]
        x = np.zeros((3, c, c), np.float32)
        x[:, : img.shape[0], : img.shape[1]] = normalize_image(np.ascontiguousarray(img))
        y = np.zeros((c, c), np.float32)
        y[: den.shape[0], : den.shape[1]] = den
        y8 = downsample_density(y, 8)
        return torch.from_numpy(x)[None], torch.from_numpy(np.ascontiguousarray(y8, np.float32))[None, None]


def _train_step(model, opt, x, y, scale: float) -> float:
    from helpers.train import train_step

    return train_step(model, x, y, opt, scale=scale)


def _build(model_name: str, model_kwargs: dict[str, Any]):
    import torch

    from helpers.models import build_model

    torch.manual_seed(0)
    kwargs = dict(model_kwargs)
    if model_name == "csrnet":
        kwargs["pretrained"] = None
    model = build_model(model_name, **kwargs).train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-6)


def bench_model(model_name: str, part: str, root: str, n_images: int, steps: int,
                crop: int | None, resize: float | None) -> dict[str, Any]:
    """Measure one model; returns the numbers printed by :func:`main`."""
    import torch

    from helpers.data import list_records, take_evenly
    from helpers.density import DensityParams
    from helpers.samples import CrowdDataset
    from helpers.tools.cache import load_density
    from helpers.tools.loading import make_loader
    from helpers.tools.recipes import recommended_config

    cfg = recommended_config(model_name, part, "unused", quick=False)
    crop = int(crop or cfg.crop)
    resize = float(resize if resize is not None else DEFAULT_RESIZE.get(model_name, cfg.resize))
    bs, workers = int(cfg.batch_size), int(cfg.workers or 0)
    params = DensityParams(method=cfg.density_method, sigma=cfg.resolved().density_sigma)
    records = take_evenly(list_records(part, "fit", root), n_images)
    for r in records:  # make sure the HDF5 files exist (not timed)
        load_density(r, params)
    n_samples = steps * bs
    row: dict[str, Any] = {"model": model_name, "part": part, "crop": crop, "resize": resize,
                           "batch_size": bs, "workers": workers, "images": len(records),
                           "samples": n_samples, "threads": torch.get_num_threads(),
                           "model_kwargs": dict(cfg.model_kwargs)}

    # ---- ours: cached dataset + batching
    ds = CrowdDataset(records, "train", crop=crop, resize=resize, rescale=cfg.rescale, flip=cfg.flip,
                      density_params=params, cache_in_memory=True, seed=0, density_fn=load_density)
    t0 = time.perf_counter()
    ds.preload(progress=False)
    row["cache_fill_s"] = time.perf_counter() - t0
    loader = make_loader(ds, bs, shuffle=True, seed=0, workers=workers)

    def batches(count: int):
        done, epoch = 0, 0
        while True:
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                yield batch
                done += 1
                if done >= count:
                    return
            epoch += 1

    t0 = time.perf_counter()
    got = sum(x.shape[0] for x, _ in batches(max(steps, -(-len(records) // bs))))
    row["ours_data_images_per_s"] = got / (time.perf_counter() - t0)

    model, opt = _build(model_name, cfg.model_kwargs)
    it = batches(steps + 1)
    x, y = next(it)
    _train_step(model, opt, x, y, cfg.scale)  # warm-up, not timed
    t0 = time.perf_counter()
    done = 0
    for x, y in it:
        _train_step(model, opt, x, y, cfg.scale)
        done += x.shape[0]
    row["ours_train_samples_per_s"] = done / (time.perf_counter() - t0)

    # ---- plain: decode + HDF5 read per sample, batch size 1
    plain = PlainSamples(records, crop, resize, params)
    t0 = time.perf_counter()
    n_data = max(len(records), min(n_samples, 2 * len(records)))
    for i in range(n_data):
        plain.sample(i % len(records))
    row["plain_data_images_per_s"] = n_data / (time.perf_counter() - t0)

    model, opt = _build(model_name, cfg.model_kwargs)
    _train_step(model, opt, *plain.sample(0), cfg.scale)  # warm-up, not timed
    order = np.random.default_rng(1).permutation(n_samples) % len(records)
    t0 = time.perf_counter()
    for i in order:
        _train_step(model, opt, *plain.sample(int(i)), cfg.scale)
    row["plain_train_samples_per_s"] = n_samples / (time.perf_counter() - t0)
    row["train_speedup"] = row["ours_train_samples_per_s"] / row["plain_train_samples_per_s"]
    row["data_speedup"] = row["ours_data_images_per_s"] / row["plain_data_images_per_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/training.py",
        description="Training samples/s of each model: cached, batched pipeline vs decode-every-sample "
        "batch-1 pipeline, plus the data pipeline alone.",
    )
    parser.add_argument("--part", default="B", help="ShanghaiTech part A or B (default B)")
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, help="optimiser steps of the cached pipeline (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--images", type=int, default=16, help="fit images to draw samples from (default 16)")
    parser.add_argument("--crop", type=int, help="crop side in pixels (default: the recipe's, 256)")
    parser.add_argument("--resize", type=float,
                        help="resolution factor (default: 1.0 for csrnet, the recipe's for heatmap_cnn)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            import torch

            if args.threads < 1:
                raise CrowdError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        from helpers.data import resolve_data_source

        source = resolve_data_source()
        if source.synthetic:
            print("note: CROWD_DATA is not set; measuring on the synthetic set.", file=sys.stderr)
        part = str(args.part).upper()
        if part not in ("A", "B"):
            raise CrowdError(f"--part must be A or B, not {args.part!r}")
        if args.steps is not None and args.steps < 1 or args.images < 1:
            raise CrowdError("--steps and --images must be >= 1")
        if args.crop is not None and (args.crop < 8 or args.crop % 8):
            raise CrowdError(f"--crop must be a positive multiple of 8, got {args.crop}")
        names = MODELS if args.model == "all" else (args.model,)
        for name in names:
            steps = args.steps or DEFAULT_STEPS[name]
            row = bench_model(name, part, str(source.root), args.images, steps, args.crop, args.resize)
            print(f"{name} {row['model_kwargs'] or ''} part {part}, crop {row['crop']}x{row['crop']} at resize {row['resize']:g}, "
                  f"{row['samples']} samples, {row['threads']} threads:")
            print(f"  ours  (in-memory cache, batch {row['batch_size']}, {row['workers']} workers): "
                  f"{row['ours_train_samples_per_s']:.2f} training samples/s; data alone "
                  f"{row['ours_data_images_per_s']:.1f} images/s; cache fill {row['cache_fill_s']:.1f} s "
                  f"for {row['images']} images")
            print(f"  plain (decode JPEG + read HDF5 per sample, batch 1): "
                  f"{row['plain_train_samples_per_s']:.2f} training samples/s; data alone "
                  f"{row['plain_data_images_per_s']:.1f} images/s")
            print(f"  ratio ours/plain: training x{row['train_speedup']:.2f}, data x{row['data_speedup']:.1f}")
            print(json.dumps(row), flush=True)
    except CrowdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
