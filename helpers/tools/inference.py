"""Counting in practice: checkpoint paths, any image, the fast path, blended tiles, ``crowd predict``.

:func:`count_image` is :func:`helpers.predict.count` with everything a product needs around it:

* ``image``: a file path, a PIL image or any array (:func:`as_rgb_uint8`: grayscale, RGBA,
  16-bit, float in [0, 1], bool);
* ``model``: an ``nn.Module`` or a checkpoint path (:func:`load_cached_model`: loaded once and
  kept; its density scale and training resize are used);
* ``fast=True``: on CUDA float16 autocast and ``channels_last``; on CPU
  :func:`helpers.tools.fast_inference.prepare_fast_cpu` (BatchNorm folded, ``channels_last``,
  int8 where the processor has fast int8, calibrated on ``calibration`` images or on the first
  image counted; falls back to float32 with one printed line if quantization fails);
* ``overlap``: tiles with a smaller context margin than the receptive field needs are not exact;
  they then overlap by ``overlap`` pixels (default 128) and are blended with weights that rise
  linearly across each overlap (:func:`blend_weights`): a weighted average, so no person is
  counted twice.

Command line: ``crowd predict IMAGE [IMAGE ...] --checkpoint runs/NAME/best.pt [--out DIR]
[--tile N] [--overlap N] [--margin N] [--device D] [--threshold T] [--fast] [--max-pixels N]``
prints one JSON line per image ``{"path", "count", "seconds", "tiled", "overlay"}`` and writes an
overlay PNG per image into ``--out`` (default ``build/predictions``). An unreadable image prints
``error: PATH: MESSAGE`` to stderr, the other images are still counted, and the status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers import config
from helpers.errors import CrowdError, ImageReadError
from helpers.predict import (
    AUTO_TILE_PIXELS,
    DEFAULT_STRIDE,
    DEFAULT_TILE,
    MAX_PIXELS,
    Prediction,
    check_tiling,
    context_margin,
    forward_cells,
    load_image,
    prediction_from_cells,
    prepare_image,
)

#: Default overlap (pixels) of neighbouring tiles when the margin does not cover the receptive field.
DEFAULT_OVERLAP = 128
#: Loaded checkpoints kept in memory by :func:`load_cached_model` (most recently loaded last).
MODEL_CACHE_SIZE = 4

_MODEL_CACHE: dict[tuple[str, int, int, str], tuple[Any, Any]] = {}
#: Fast CPU versions of modules (:func:`fast_cpu_model`), dropped with their module.
_FAST_CPU_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- images


def as_rgb_uint8(image: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Convert a PIL image or an array to ``H x W x 3`` uint8 RGB, as helpers.data reads files.

    Arrays may be ``H x W`` (grayscale), ``H x W x 1``, ``x 2`` (gray + alpha), ``x 3`` (RGB) or
    ``x 4`` (RGBA), holding ``uint8``; ``bool``; ``uint16`` (scaled by 255 / 65535, like 16-bit
    files); other integers in 0-255; or floats in ``[0, 1]`` (anything else is refused: a float
    image in 0-255 would turn white). Grayscale is repeated over three channels and alpha is
    composited over white by PIL, exactly as for files. Raises :class:`ImageReadError` otherwise,
    or for more than ``max_pixels`` pixels.
    """
    from PIL import Image

    from helpers.data import to_rgb_uint8

    if isinstance(image, Image.Image):
        _check_size(image.size[1], image.size[0], max_pixels, "The image")
        image.load()
        return to_rgb_uint8(image)
    if not isinstance(image, np.ndarray):
        raise ImageReadError(
            f"Expected an image path, a PIL image or a numpy array, got {type(image).__name__}."
        )
    arr = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise ImageReadError(
            f"An image array must be H x W or H x W x C with C in 1-4, got shape {arr.shape}."
        )
    _check_size(arr.shape[0], arr.shape[1], max_pixels, "The image array")
    arr = _to_uint8(arr)
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.shape[2] == 3:
        return np.ascontiguousarray(arr)
    mode = "LA" if arr.shape[2] == 2 else "RGBA"
    return to_rgb_uint8(Image.fromarray(np.ascontiguousarray(arr), mode=mode))


def _check_size(height: int, width: int, max_pixels: int, what: str) -> None:
    from helpers.data import megapixels

    if height < 1 or width < 1:
        raise ImageReadError(f"{what} is empty ({height} x {width} pixels).")
    if height * width > max_pixels:
        raise ImageReadError(
            f"{what} is {width}x{height} = {megapixels(width * height)}, over the limit of "
            f"{megapixels(max_pixels)}. Downscale it first, or raise max_pixels if you have the "
            "memory (about 3 bytes per pixel plus two float64 values per 8x8 block)."
        )


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale an array's values to uint8 (rules in :func:`as_rgb_uint8`)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype == np.uint16:
        return np.round(arr * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageReadError(
                f"An integer image array of type {arr.dtype} must hold 0-255, found {lo} to {hi}; "
                "convert it to uint8 (or uint16 for 16-bit data) first."
            )
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageReadError("The image array contains NaN or infinite values.")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageReadError(
                f"A float image array must hold values in [0, 1], found {lo:g} to {hi:g}; divide "
                "0-255 data by 255 or pass it as uint8."
            )
        return np.round(arr * 255.0).astype(np.uint8)
    raise ImageReadError(f"Cannot use an image array of type {arr.dtype}; use uint8 RGB.")


def load_any_image(image: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A path (EXIF rotation applied, :func:`helpers.predict.load_image`), PIL image or any array
    (:func:`as_rgb_uint8`) as ``H x W x 3`` uint8 RGB."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels)
    return as_rgb_uint8(image, max_pixels)


# --------------------------------------------------------------------------- models


def load_cached_model(path: str | Path, device: Any = None):
    """``helpers.tools.checkpoints.load_model(path, device)`` -> ``(model, info)``, kept in memory.

    Remembered per file, version (modification time and size) and device: a checkpoint that
    changes on disk is loaded again. At most :data:`MODEL_CACHE_SIZE` models are kept.
    """
    from helpers.tools.checkpoints import load_model

    path = Path(path).expanduser()
    dev = config.pick_device(None if device is None else str(device))
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(dev))
    except OSError:
        key = None  # missing file: load_model raises the explanatory error
    if key is not None and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    model, info = load_model(path, dev)
    if key is not None:
        _MODEL_CACHE[key] = (model, info)
        while len(_MODEL_CACHE) > MODEL_CACHE_SIZE:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    return model, info


def _resolve_model(model: Any, scale: float | None, input_scale: float | None, device: Any):
    """``(module, scale, input_scale)`` for a module or a checkpoint path; the module on ``device``."""
    if isinstance(model, (str, os.PathLike)):
        module, info = load_cached_model(model, device)
        default_scale, default_input = float(info.scale), info.input_scale
    elif isinstance(model, nn.Module):
        module = model
        default_scale = float(getattr(model, "density_scale", 1.0))
        default_input = float(getattr(model, "input_scale", 1.0))
        if device is not None:
            module.to(config.pick_device(str(device)))
    else:
        raise TypeError(f"model must be an nn.Module or a checkpoint path, not {type(model).__name__}")
    return (module, default_scale if scale is None else float(scale),
            default_input if input_scale is None else float(input_scale))


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class FastRunner(nn.Module):
    """Runs ``inner`` on ``channels_last`` inputs, under float16 autocast if ``autocast``."""

    def __init__(self, inner: nn.Module, autocast: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.autocast = autocast
        self.output_stride = int(getattr(inner, "output_stride", DEFAULT_STRIDE))
        self.train(inner.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.autocast else contextlib.nullcontext()
        with ctx:
            return self.inner(x).float()


def fast_cpu_model(module: nn.Module, calibration: Any, from_counted_image: bool) -> nn.Module:
    """:func:`helpers.tools.fast_inference.prepare_fast_cpu` of ``module``, made once and kept.

    Prepared again when the module's weights change (their version counters) or when other
    calibration images are passed. ``calibration``: one RGB array (the image counted) or a
    sequence of images (arrays or paths).
    """
    from helpers.tools.fast_inference import calibration_tensors, has_fast_int8, prepare_fast_cpu

    weights = tuple(t._version for t in module.state_dict().values())
    key = (weights, None if from_counted_image else id(calibration))
    kept = _FAST_CPU_MODELS.get(module)
    if kept is not None and kept[0] == key:
        return kept[1]
    tensors = None
    if has_fast_int8():
        images = [calibration] if from_counted_image else [load_any_image(c) for c in calibration]
        tensors = calibration_tensors(images)
    fast = prepare_fast_cpu(module, tensors)
    _FAST_CPU_MODELS[module] = (key, fast)
    return fast


def _fast_runner(module: nn.Module, resized: np.ndarray, calibration: Any) -> nn.Module:
    """The module as it runs on the fast path of its device (module docstring)."""
    device = _device_of(module)
    if device.type == "cpu":
        from_image = calibration is None
        return FastRunner(fast_cpu_model(module, resized if from_image else calibration, from_image))
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
        return FastRunner(module, autocast=True)
    return module  # other devices (Apple MPS): no change


# --------------------------------------------------------------------------- blended tiles


def tile_starts(size: int, tile: int, step: int) -> list[int]:
    """Offsets of tiles of ``tile`` covering ``[0, size)`` every ``step``; the last ends at ``size``."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, step)) + [size - tile]


def blend_weights(n_cells: int, overlap_cells: int, first: bool, last: bool) -> np.ndarray:
    """1-D weights ``(n_cells,)`` float64 of one tile along one axis.

    The weight rises as ``(k + 1) / (o + 1)`` over the ``o = overlap_cells`` cells next to an inner
    edge and is 1 elsewhere; ``first`` / ``last`` mark edges on the image border (weight 1 there).
    In an overlap of exactly ``o`` cells the weights of the two tiles sum to 1.
    """
    k = np.arange(n_cells, dtype=np.float64)
    w = np.ones(n_cells, dtype=np.float64)
    o = max(int(overlap_cells), 0)
    if o > 0:
        if not first:
            w = np.minimum(w, (k + 1) / (o + 1))
        if not last:
            w = np.minimum(w, (n_cells - k) / (o + 1))
    return w


def check_blended_tiling(tile: int, overlap: int, margin: int, stride: int) -> None:
    """:func:`helpers.predict.check_tiling`, and ``overlap`` a multiple of the stride <= tile / 2."""
    check_tiling(tile, margin, stride)
    if overlap < 0 or overlap % stride:
        raise ValueError(f"overlap must be a multiple of the stride {stride} and >= 0, got {overlap}")
    if 2 * overlap > tile:
        raise ValueError(f"overlap ({overlap}) must be at most half the tile ({tile})")


def blended_cells(model: nn.Module, image: np.ndarray, tile: int, overlap: int, margin: int,
                  stride: int = DEFAULT_STRIDE, device: Any = None,
                  progress: bool = False) -> tuple[np.ndarray, int]:
    """The ``(ceil(h/s), ceil(w/s))`` float64 cell map of overlapping, blended tiles, and their number.

    Tiles of ``tile`` pixels start every ``tile - overlap`` (the last of a row or column moved
    back to end at the border); each is run with ``margin`` pixels of context on every side, its
    own cells kept and averaged with its neighbours' by :func:`blend_weights`.
    """
    from tqdm.auto import tqdm

    h, w = image.shape[:2]
    s = stride
    ch, cw = -(-h // s), -(-w // s)
    ph, pw = ch * s, cw * s  # padded size
    th, tw = min(tile, ph), min(tile, pw)
    boxes = [(y, x) for y in tile_starts(ph, th, th - overlap) for x in tile_starts(pw, tw, tw - overlap)]
    acc, wsum = np.zeros((ch, cw)), np.zeros((ch, cw))
    o = overlap // s
    for y0, x0 in tqdm(boxes, desc="tiles", unit="tile", leave=False, disable=not progress or len(boxes) < 2):
        wy0, wy1 = max(0, y0 - margin), min(ph, y0 + th + margin)
        wx0, wx1 = max(0, x0 - margin), min(pw, x0 + tw + margin)
        out = forward_cells(model, prepare_image(image[wy0:wy1, wx0:wx1], 1.0, s), s, device)
        ry, rx = (y0 - wy0) // s, (x0 - wx0) // s
        weight = np.outer(blend_weights(th // s, o, y0 == 0, y0 + th >= ph),
                          blend_weights(tw // s, o, x0 == 0, x0 + tw >= pw))
        cy, cx = y0 // s, x0 // s
        acc[cy : cy + th // s, cx : cx + tw // s] += weight * out[ry : ry + th // s, rx : rx + tw // s]
        wsum[cy : cy + th // s, cx : cx + tw // s] += weight
    return acc / wsum, len(boxes)


# --------------------------------------------------------------------------- counting


def count_image(
    image: Any,
    model: Any,
    *,
    scale: float | None = None,
    input_scale: float | None = None,
    device: Any = None,
    tile: int | None = None,
    overlap: int | None = None,
    margin: int | None = None,
    threshold: float | None = None,
    max_pixels: int = MAX_PIXELS,
    fast: bool = False,
    calibration: Sequence[Any] | None = None,
    progress: bool = False,
) -> Prediction:
    """Count the people in any image with a module or a checkpoint path (module docstring).

    The arguments shared with :func:`helpers.predict.count` mean the same, except that
    ``image`` may be any image :func:`load_any_image` reads and ``model`` a checkpoint path, whose
    ``scale`` and training ``resize`` (``input_scale``) are then the defaults. ``overlap``: pixels
    shared by neighbouring tiles, blended (multiple of the stride, at most ``tile / 2``); default 0
    when ``margin`` covers the receptive field (exact tiles), else :data:`DEFAULT_OVERLAP`.
    ``fast``: the device's fast path; ``calibration``: RGB images (arrays or paths, at the
    resolution the model sees) for the int8 model on CPU, default the image counted.
    """
    from helpers.predict import count
    from helpers.samples import resize_image, scaled_shape

    t0 = time.perf_counter()
    rgb = load_any_image(image, max_pixels)
    module, scale, input_scale = _resolve_model(model, scale, input_scale, device)
    stride = int(getattr(module, "output_stride", DEFAULT_STRIDE))
    h, w = scaled_shape(rgb.shape[:2], input_scale) if input_scale != 1.0 else rgb.shape[:2]
    tile = (DEFAULT_TILE if h * w > AUTO_TILE_PIXELS else 0) if tile is None else int(tile)
    needed = context_margin(module, stride)
    margin = (needed or 0) if margin is None else int(margin)
    if overlap is None:
        overlap = 0 if needed is not None and margin >= needed else DEFAULT_OVERLAP
    if tile:
        check_blended_tiling(tile, int(overlap), margin, stride)
    blended = bool(tile and overlap)
    resized = None
    if blended or (fast and calibration is None):
        resized = rgb if (h, w) == rgb.shape[:2] else resize_image(rgb, (h, w))
    runner = _fast_runner(module, resized, calibration) if fast else module
    if not blended:
        pred = count(rgb, runner, scale=scale, input_scale=input_scale, tile=tile, margin=margin,
                     threshold=threshold, max_pixels=max_pixels, progress=progress)
    else:
        was_training = runner.training
        runner.eval()
        try:
            with torch.inference_mode():
                cells, n_tiles = blended_cells(runner, resized, tile, int(overlap), margin, stride,
                                               _device_of(module), progress)
        finally:
            runner.train(was_training)
        pred = prediction_from_cells(cells, scale, rgb.shape[:2], (h, w), stride, threshold,
                                     n_tiles, 0.0, input_scale)
    pred.seconds = time.perf_counter() - t0
    return pred


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``crowd predict``."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by crowd train")
    parser.add_argument("--out", default=None, help="folder for overlay PNGs (default: build/predictions)")
    parser.add_argument("--tile", type=int, default=None,
                        help=f"tile size in pixels (default: tiles of {DEFAULT_TILE} above "
                        f"{AUTO_TILE_PIXELS / 1e6:g} MP; 0 = never tile)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="tile overlap in pixels, blended (default: 0 when the margin covers "
                        f"the receptive field, else {DEFAULT_OVERLAP})")
    parser.add_argument("--margin", type=int, default=None,
                        help="context pixels around each tile (default: from the receptive field)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: automatic)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="head points: local maxima above this many people per 8x8 cell "
                        "(default: the round(count) strongest maxima)")
    parser.add_argument("--fast", action="store_true",
                        help="fast path: float16 + channels_last on CUDA; int8 + folded BatchNorm on CPU")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse larger images")


def _overlay_path(out_dir: Path, image_path: Path, used: set[Path]) -> Path:
    """``OUT/<stem>_density.png``, with ``_2``, ``_3``... when two inputs share a name."""
    target = out_dir / f"{image_path.stem}_density.png"
    n = 2
    while target in used:
        target = out_dir / f"{image_path.stem}_{n}_density.png"
        n += 1
    used.add(target)
    return target


def _count_one(path: Path, args: argparse.Namespace, device, out_dir: Path, used: set[Path]) -> dict:
    """Count one image file and write its overlay; returns the JSON row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.viz.predict import overlay_figure, save_png

    t0 = time.perf_counter()
    image = load_image(path, max_pixels=args.max_pixels)
    pred = count_image(image, args.checkpoint, device=device, tile=args.tile, overlap=args.overlap,
                       margin=args.margin, threshold=args.threshold, max_pixels=args.max_pixels,
                       fast=args.fast, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    fig = overlay_figure(image, pred.density_lowres, pred.count, title=path.name, points=pred.points)
    try:
        overlay = save_png(fig, _overlay_path(out_dir, path, used))
    finally:
        plt.close(fig)
    return {"path": str(path), "count": round(pred.count, 3), "seconds": round(seconds, 3),
            "tiled": pred.tiled, "overlay": str(overlay)}


def run(args: argparse.Namespace) -> int:
    """``crowd predict``: count each image, print one JSON line each (module docstring)."""
    try:
        device = config.pick_device(args.device)
        model, _ = load_cached_model(args.checkpoint, device)
        if args.tile is not None and args.tile > 0:
            stride = int(getattr(model, "output_stride", DEFAULT_STRIDE))
            check_blended_tiling(args.tile, args.overlap or 0, args.margin or 0, stride)
    except (ValueError, RuntimeError) as exc:
        raise CrowdError(str(exc)) from exc
    out_dir = Path(args.out) if args.out else config.project_root() / "build" / "predictions"
    status = 0
    used: set[Path] = set()
    for name in args.images:
        path = Path(name)
        try:
            row = _count_one(path, args, device, out_dir, used)
        except (CrowdError, ValueError, OSError, RuntimeError, MemoryError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps(row), flush=True)
    return status
