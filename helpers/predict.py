"""Counting people in any image with a trained model: whole images, or overlapping tiles.

:func:`count` takes an image (a file path, a PIL image or an array of any size) and a model (an
``nn.Module`` or a checkpoint path) and returns a :class:`Prediction`: the count, the density map
at the model's stride and at image resolution, head points, and the time taken.

Whole-image inference
---------------------
The image is converted to ``H x W x 3`` uint8 RGB (:func:`as_rgb_uint8`), ImageNet-normalised
(:func:`helpers.samples.normalize_image`) and padded at the bottom and right to a multiple of the
model's stride ``s = 8`` with zeros *after* normalisation, i.e. with the ImageNet mean colour,
exactly as evaluation samples are padded (:class:`helpers.samples.CrowdDataset`, eval mode). The
model maps it to ``ceil(H / s) x ceil(W / s)`` cells of ``scale x people``; the count is the sum of
the map divided by ``scale``.

Tiled inference
---------------
A 24 MP phone photo does not fit through a network at once on a laptop: the first layer of CSRNet
alone holds 64 channels x 24 M pixels x 4 bytes = 6 GB. Large images are therefore cut into
``tile x tile`` tiles (default 768 px) that start every ``tile - overlap`` pixels; tile size,
overlap and margin are multiples of the stride, so every tile's output cells line up with the
whole-image grid. Each tile is normalised and run on its own, so memory does not grow with the
image except for two ``ceil(H/s) x ceil(W/s)`` float64 accumulators and the uint8 image itself.

*Context margin.* Near the edge of its input a network sees zero padding instead of the real
neighbourhood, and the outputs there change. An output cell depends only on the pixels of its
receptive field (162 px for HeatmapCNN, 284 px for CSRNet), so each tile is run with ``margin``
extra pixels of the image on every side (the window is ``tile + 2 margin``, cut at the image
border) and only the tile's own cells are kept. With the default margin, worked out from the
receptive field by :func:`context_margin` (80 px for HeatmapCNN, 144 px for CSRNet), every kept
cell sees exactly what it sees in the whole image: tiled and whole-image maps are equal up to
float rounding, and no blending is needed (the default overlap is then 0).

*Blending.* With a smaller margin (faster), or a model whose receptive field cannot be worked out,
tiles overlap by ``overlap`` pixels (default 128) and are blended with weights that rise linearly
across each overlap (in output cells, ``o = overlap / s``): in a tile's ``k``-th cell from an inner
edge the weight is ``min(1, (k + 1) / (o + 1))`` (1 at the image's own borders). In an overlap of
exactly ``o`` cells the two weights sum to 1 in every cell. Each cell's value is
``sum(w_t * pred_t) / sum(w_t)`` over the tiles ``t`` that contain it: a weighted *average*, never
a sum, so no person is counted twice however the tiles overlap (the last tile of a row or column
is moved back to end at the image border and may overlap its neighbour by more).

Tiling is automatic when ``H x W`` exceeds :data:`AUTO_TILE_PIXELS` (2.5 MP, any device), or
forced with ``tile=N``; ``tile=0`` forces whole-image inference.

Precision
---------
By default everything runs in float32. ``fast=True`` switches to the fast path of the device:

* **CUDA**: the network runs under ``torch.autocast`` (float16) in ``channels_last`` memory
  format: faster on GPUs with tensor cores, with counts that differ slightly through float16
  rounding.
* **CPU**: :func:`helpers.tools.fast_inference.prepare_fast_cpu`: BatchNorm folded into the
  convolutions, ``channels_last``, and int8 quantization where the processor has fast int8
  (VNNI/AMX). The int8 model is calibrated once per model on ``calibration`` images (RGB arrays;
  :func:`helpers.tools.fast_inference.training_calibration` gives training images), or, if none are
  given, on the first image counted; it is then kept for the next calls. ``benchmarks/inference.py``
  measures on a 2-core AVX-512 VNNI CPU: CSRNet about 7x and HeatmapCNN about 5x faster, counts
  within about 1% of float32 on average. Worth it for many images or large photos; the first call
  pays a few seconds of calibration.
* other devices (Apple MPS): no change.

Command line::

    python -m helpers.predict IMAGE [IMAGE ...] --checkpoint runs/NAME/best.pt [--out DIR]
        [--tile N] [--overlap N] [--margin N] [--device D] [--threshold T] [--fast]

prints one JSON line per image ``{"path", "count", "seconds", "tiled", "overlay"}`` and writes an
overlay PNG (density over the photo, with the count) per image into ``--out`` (default
``build/predictions``). A file that cannot be read prints ``error: PATH: MESSAGE`` to stderr; the
other images are still processed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from helpers.errors import CrowdError, ImageReadError

#: Images with more pixels than this are tiled automatically (2.5 MP, e.g. 1920 x 1300). A
#: HeatmapCNN (width 32) forward pass over 2.5 MP takes about 0.3 GB on a CPU, CSRNet about 2 GB.
AUTO_TILE_PIXELS = 2_500_000
#: Default tile side (pixels) for tiled inference. With CSRNet's 144-px context margin a float32
#: forward pass sees 1056 x 1056 px; counting a 4000 x 3000 photo so peaks at about 1.6 GB of
#: resident memory on a CPU, against 2.0 GB with 1024-px tiles (``benchmarks/inference.py``).
DEFAULT_TILE = 768
#: Default overlap between neighbouring tiles (pixels).
DEFAULT_OVERLAP = 128
#: Largest image accepted (pixels), as for reading dataset images (helpers.data).
MAX_PIXELS = 100_000_000
#: Output stride assumed for a model without an ``output_stride`` attribute.
DEFAULT_STRIDE = 8
#: Loaded checkpoints kept in memory by :func:`count` (most recently loaded last).
MODEL_CACHE_SIZE = 4

_MODEL_CACHE: dict[tuple[str, int, int, str], tuple[Any, Any]] = {}


# --------------------------------------------------------------------------- result


@dataclass(eq=False)
class Prediction:
    """The result of :func:`count` for one image of ``image_shape = (H, W)`` pixels.

    * ``count``: predicted number of people (the sum of ``density_lowres``).
    * ``density_lowres``: ``(ceil(H / s), ceil(W / s))`` float32, people per ``s x s`` cell at
      the model's stride ``s`` (cells on the bottom row and right column may extend past the
      image into the padding; their people are in the image part).
    * ``density`` (computed on first access): ``(H, W)`` float32, people per pixel: each cell's
      people spread evenly over its pixels inside the image, so the sum is still ``count``.
      4 bytes per pixel (96 MB for a 6000 x 4000 photo), hence not made unless asked for.
    * ``points``: ``(M, 2)`` float64 head positions ``(x, y)`` in image pixels, the centres of
      the peak cells (helpers.metrics), moved inside the image when a cell sticks out of it.
    * ``seconds``: wall time of :func:`count` (reading a file, inference and peak finding).
    * ``tiled``: whether the image was cut into several tiles; ``n_tiles``: forward passes.
    * ``input_scale``: the image was resized by this factor before inference (the scale the
      model was trained at) to ``model_shape``; ``density_lowres`` and the stride refer to that
      resized image, while ``density`` and ``points`` are in the original image's pixels.
    """

    count: float
    density_lowres: np.ndarray = field(repr=False)
    points: np.ndarray = field(repr=False)
    seconds: float
    tiled: bool
    image_shape: tuple[int, int]
    stride: int = DEFAULT_STRIDE
    n_tiles: int = 1
    input_scale: float = 1.0
    model_shape: tuple[int, int] | None = None

    @cached_property
    def density(self) -> np.ndarray:
        """``(H, W)`` float32 people per pixel, summing to ``count`` (see the class docstring)."""
        model_shape = self.model_shape or self.image_shape
        dense = upsample_density(self.density_lowres, model_shape, self.stride)
        if tuple(model_shape) != tuple(self.image_shape):
            from helpers.samples import resample_density

            dense = resample_density(dense, self.image_shape)
        return dense


def upsample_density(lowres: np.ndarray, image_shape: Sequence[int], stride: int = DEFAULT_STRIDE) -> np.ndarray:
    """Spread a ``(ceil(H/s), ceil(W/s))`` cell map over an ``(H, W)`` image, keeping its sum.

    Cell ``(i, j)`` covers pixels ``[i s, (i+1) s) x [j s, (j+1) s)`` cropped to the image; its
    mass is divided evenly among those pixels (``1 / s^2`` of it per pixel for an inner cell,
    more per pixel for a cell cut by the image border), so block sums give the cells back.
    Returns float32 ``(H, W)``.
    """
    lowres = np.asarray(lowres)
    h, w = int(image_shape[0]), int(image_shape[1])
    s = int(stride)
    ch, cw = -(-h // s), -(-w // s)
    if lowres.shape != (ch, cw):
        raise ValueError(
            f"a {h}x{w} image at stride {s} has a {ch}x{cw} cell map, got {lowres.shape}"
        )
    row_cell = np.arange(h) // s
    col_cell = np.arange(w) // s
    rows_in = np.minimum(s, h - np.arange(ch) * s).astype(np.float64)  # image rows per cell row
    cols_in = np.minimum(s, w - np.arange(cw) * s).astype(np.float64)
    per_pixel = lowres.astype(np.float64) / np.outer(rows_in, cols_in)  # (ch, cw)
    out = per_pixel.astype(np.float32)[row_cell][:, col_cell]
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- images


def as_rgb_uint8(image: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Convert a PIL image or an array to ``H x W x 3`` uint8 RGB, as helpers.data reads files.

    Arrays may be ``H x W`` (grayscale), ``H x W x 1``, ``x 2`` (gray + alpha), ``x 3`` (RGB) or
    ``x 4`` (RGBA), with values in

    * ``uint8`` (0-255), ``bool`` (False/True = black/white);
    * ``uint16`` (0-65535, scaled by 255 / 65535 and rounded, like 16-bit image files);
    * other integer types holding 0-255 (taken as 8-bit);
    * ``float`` in ``[0, 1]`` (scaled by 255 and rounded; anything else is refused, since a float
      image in 0-255 would otherwise turn white).

    Grayscale is repeated over three channels and alpha is composited over white, both by
    :mod:`PIL` exactly as for image files. Raises :class:`ImageReadError` for anything else, or
    for more than ``max_pixels`` pixels.
    """
    from PIL import Image

    from helpers.data import to_rgb_uint8

    if isinstance(image, Image.Image):
        width, height = image.size
        _check_size(height, width, max_pixels, "The image")
        image.load()
        return to_rgb_uint8(image)
    if not isinstance(image, np.ndarray):
        raise ImageReadError(
            f"Expected an image path, a PIL image or a numpy array, got {type(image).__name__}."
        )
    arr = image
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
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


def load_image(image: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A path (read with the camera's EXIF rotation applied), PIL image or array -> RGB uint8."""
    import os

    if isinstance(image, (str, os.PathLike)):
        from helpers.data import read_image

        return read_image(Path(image), max_pixels=max_pixels, exif_orientation=True)
    return as_rgb_uint8(image, max_pixels=max_pixels)


# --------------------------------------------------------------------------- models


def load_cached_model(path: str | Path, device: Any = None):
    """``helpers.tools.checkpoints.load_model(path, device)``, remembered per file, version and device.

    A checkpoint that changes on disk (new modification time or size) is loaded again. At most
    :data:`MODEL_CACHE_SIZE` models are kept.
    """

    from helpers import config
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


def _resolve_model(model: Any, scale: float | None, device: Any):
    """``(module, scale, device, input_scale)`` for a module or a checkpoint path.

    ``input_scale`` is the image scale the model was trained at: the checkpoint's
    ``TrainConfig.resize``, or a module's ``input_scale`` attribute, else 1.0.
    """
    import os

    import torch

    if isinstance(model, (str, os.PathLike)):
        module, info = load_cached_model(model, device)
        default_scale = float(info.scale)
        input_scale = info.input_scale
    elif isinstance(model, torch.nn.Module):
        module = model
        default_scale = float(getattr(model, "density_scale", 1.0))
        input_scale = float(getattr(model, "input_scale", 1.0))
        if device is not None:
            from helpers import config

            module.to(config.pick_device(str(device)))
    else:
        raise TypeError(f"model must be an nn.Module or a checkpoint path, not {type(model).__name__}")
    param = next(module.parameters(), None)
    if param is None:
        param = next(module.buffers(), None)
    dev = param.device if param is not None else torch.device(device or "cpu")
    scale = default_scale if scale is None else float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale}")
    return module, scale, dev, input_scale


# --------------------------------------------------------------------------- tiling


def tile_starts(size: int, tile: int, step: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``[0, size)`` every ``step``; the last ends at ``size``."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def blend_weights(n_cells: int, overlap_cells: int, first: bool, last: bool) -> np.ndarray:
    """1-D weights ``(n_cells,)`` float64 of one tile along one axis (module docstring).

    The weight rises as ``(k + 1) / (o + 1)`` over the ``o = overlap_cells`` cells next to an inner
    edge and is 1 elsewhere; ``first`` / ``last`` mark edges on the image border (weight 1 there).
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


def _check_tiling(tile: int, overlap: int, margin: int, stride: int) -> None:
    if tile < stride or tile % stride:
        raise ValueError(f"tile must be a positive multiple of the model's stride {stride}, got {tile}")
    if overlap < 0 or overlap % stride:
        raise ValueError(f"overlap must be a multiple of the stride {stride} and >= 0, got {overlap}")
    if 2 * overlap > tile:
        raise ValueError(f"overlap ({overlap}) must be at most half the tile ({tile})")
    if margin < 0 or margin % stride:
        raise ValueError(f"margin must be a multiple of the stride {stride} and >= 0, got {margin}")


def _run_tile(module, x_np: np.ndarray, device, fast: bool):
    """Forward one normalised ``(3, h, w)`` array; returns the ``(h/s, w/s)`` float64 map.

    ``fast``: channels_last input, and float16 autocast on CUDA (the CPU fast model is prepared
    by :func:`_fast_cpu_model`).
    """
    import torch

    x = torch.from_numpy(x_np)[None].to(device)
    if fast:
        x = x.contiguous(memory_format=torch.channels_last)
    if fast and device.type == "cuda":
        ctx = torch.autocast(device.type, dtype=torch.float16)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        out = module(x)
    if out.ndim != 4 or out.shape[:2] != (1, 1):
        raise ValueError(f"the model must return a (1, 1, h, w) density map, got {tuple(out.shape)}")
    return out[0, 0].float().cpu().numpy().astype(np.float64)


#: Fast CPU versions of modules (:func:`_fast_cpu_model`), dropped with their module.
_FAST_CPU_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fast_cpu_model(module, calibration: Any, from_counted_image: bool):
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
        images = [calibration] if from_counted_image else [load_image(c) for c in calibration]
        tensors = calibration_tensors(images)
    fast = prepare_fast_cpu(module, tensors)
    _FAST_CPU_MODELS[module] = (key, fast)
    return fast


def context_margin(module, stride: int = DEFAULT_STRIDE) -> int | None:
    """Pixels of context a tile needs on each side for its output cells to be exact.

    From the receptive field (:func:`helpers.models.receptive_field`): output cell ``i`` sees
    input pixels ``start + i * jump +- (rf - 1) / 2``, so a cell's field reaches
    ``(rf - 1) / 2 - start`` pixels before the cell's first pixel and
    ``start + (rf - 1) / 2 - (jump - 1)`` after its last; the larger, rounded up to a multiple of
    the stride. 80 px for HeatmapCNN (field 162 px), 144 px for CSRNet (284 px), 0 for a model
    whose cells see only their own pixels. ``None`` when it cannot be worked out (no convolution
    or pooling modules, or non-square kernels). Assumes the layers form a chain in registration
    order, as in both networks of the series.
    """
    from helpers.models import receptive_field

    try:
        rows = receptive_field(module)
    except (ValueError, TypeError):
        return None
    if not rows:
        return None
    last = rows[-1]
    half = (last.rf - 1) / 2
    need = max(half - last.start, last.start + half - (last.jump - 1), 0.0)
    return int(np.ceil(need / stride - 1e-9)) * stride


def _predict_cells(image: np.ndarray, module, device, stride: int, tile_hw: tuple[int, int],
                   overlap: int, margin: int, fast: bool,
                   progress: bool) -> tuple[np.ndarray, int]:
    """The blended ``(ceil(H/s), ceil(W/s))`` float64 map (model units) and the number of tiles.

    Tiles ("cores") of ``tile_hw`` pixels start every ``tile - overlap``; each is run with
    ``margin`` extra pixels of the image on every side (less at the image border), and only the
    core's output cells are kept and blended.
    """
    from tqdm.auto import tqdm

    from helpers.samples import normalize_image

    h, w = image.shape[:2]
    s = stride
    ch, cw = -(-h // s), -(-w // s)
    ph, pw = ch * s, cw * s  # padded size
    th, tw = min(tile_hw[0], ph), min(tile_hw[1], pw)
    ys, xs = tile_starts(ph, th, th - overlap), tile_starts(pw, tw, tw - overlap)
    acc = np.zeros((ch, cw), dtype=np.float64)
    wsum = np.zeros((ch, cw), dtype=np.float64)
    o = overlap // s
    boxes = [(y0, x0) for y0 in ys for x0 in xs]
    for y0, x0 in tqdm(boxes, desc="tiles", unit="tile", leave=False, disable=not progress or len(boxes) < 2):
        # the window: the core plus the context margin, inside the padded image
        wy0, wy1 = max(0, y0 - margin), min(ph, y0 + th + margin)
        wx0, wx1 = max(0, x0 - margin), min(pw, x0 + tw + margin)
        x = normalize_image(image[wy0 : min(wy1, h), wx0 : min(wx1, w)])
        if x.shape[1:] != (wy1 - wy0, wx1 - wx0):  # padding: 0 after normalisation = mean colour
            padded = np.zeros((3, wy1 - wy0, wx1 - wx0), dtype=np.float32)
            padded[:, : x.shape[1], : x.shape[2]] = x
            x = padded
        pred = _run_tile(module, x, device, fast)
        if pred.shape != ((wy1 - wy0) // s, (wx1 - wx0) // s):
            raise ValueError(
                f"the model returned a {pred.shape} map for a {wy1 - wy0}x{wx1 - wx0} input; "
                f"expected {((wy1 - wy0) // s, (wx1 - wx0) // s)} at output stride {s}"
            )
        ry, rx = (y0 - wy0) // s, (x0 - wx0) // s
        core = pred[ry : ry + th // s, rx : rx + tw // s]
        wy = blend_weights(th // s, o, y0 == 0, y0 + th >= ph)
        wx = blend_weights(tw // s, o, x0 == 0, x0 + tw >= pw)
        weight = np.outer(wy, wx)
        cy, cx = y0 // s, x0 // s
        acc[cy : cy + th // s, cx : cx + tw // s] += weight * core
        wsum[cy : cy + th // s, cx : cx + tw // s] += weight
    return acc / wsum, len(boxes)


# --------------------------------------------------------------------------- counting


def count(
    image: Any,
    model: Any,
    *,
    scale: float | None = None,
    device: Any = None,
    tile: int | None = None,
    overlap: int | None = None,
    margin: int | None = None,
    threshold: float | None = None,
    max_pixels: int = MAX_PIXELS,
    fast: bool = False,
    progress: bool = False,
    input_scale: float | None = None,
    calibration: Sequence[Any] | None = None,
) -> Prediction:
    """Predict the number of people in one image (module docstring for the method).

    Args:
        image: a file path (read with :func:`helpers.data.read_image`, EXIF rotation applied,
            as a phone shows the photo), a PIL image or an array (used as they are, see
            :func:`as_rgb_uint8`).
        model: an ``nn.Module`` returning ``(1, 1, H/s, W/s)`` for a ``(1, 3, H, W)`` normalised
            input, or a checkpoint path (:func:`helpers.tools.checkpoints.load_model`, loaded once
            and kept, see :func:`load_cached_model`).
        scale: the model predicts ``people x scale``. Default: the checkpoint's ``scale``; for a
            module its ``density_scale`` attribute if it has one, else 1.0.
        device: where to run. Default: for a checkpoint :func:`helpers.config.pick_device`; for a
            module the device its parameters are on. A module is moved there (in place).
        tile: ``None`` = tile when ``H x W > AUTO_TILE_PIXELS`` (tiles of ``DEFAULT_TILE``);
            ``0`` = never tile; ``N > 0`` = tiles of ``N`` pixels (a multiple of the stride).
        overlap: overlap of neighbouring tiles in pixels, blended (a multiple of the stride, at
            most ``tile / 2``). ``None``: 0 when ``margin`` covers the receptive field (the
            tiles are then exact and need no blending), else ``DEFAULT_OVERLAP``.
        margin: context in pixels added on every side of a tile and cut from its output (a
            multiple of the stride). ``None``: :func:`context_margin` of the model (exact
            tiles), or 0 when that cannot be worked out. Each forward pass sees at most
            ``(tile + 2 margin)^2`` pixels.
        threshold: head points: ``None`` keeps the ``round(count)`` strongest local maxima of
            the cell map (:func:`helpers.metrics.peaks_by_count`, no threshold to choose); a
            number keeps every local maximum above it, in people per ``s x s`` cell
            (:func:`helpers.metrics.find_peaks`).
        max_pixels: larger images are refused (:class:`ImageReadError`).
        fast: the device's fast path (module docstring, "Precision"): on CUDA float16 autocast
            and channels_last; on CPU folded BatchNorm, channels_last and int8 where it is fast.
        calibration: for ``fast`` on CPU, RGB images (arrays or paths) to calibrate the int8
            model on, at the resolution the model sees them; default: the image being counted.
        progress: show a progress bar over the tiles.
        input_scale: resize the image by this factor before inference. Default: the scale the
            model was trained at (the checkpoint's ``resize``; a module's ``input_scale``
            attribute; else 1.0), so heads have the size the model learned. ``tile``,
            ``overlap`` and ``margin`` are in pixels of the resized image.

    The module is put in eval mode for the call and its previous mode restored afterwards.
    """
    import torch

    from helpers.metrics import find_peaks, peaks_by_count

    t0 = time.perf_counter()
    rgb = load_image(image, max_pixels=max_pixels)
    module, scale, dev, trained_scale = _resolve_model(model, scale, device)
    input_scale = trained_scale if input_scale is None else float(input_scale)
    if not np.isfinite(input_scale) or input_scale <= 0:
        raise ValueError(f"input_scale must be a positive number, got {input_scale}")
    stride = int(getattr(module, "output_stride", DEFAULT_STRIDE))
    image_h, image_w = rgb.shape[:2]
    if input_scale != 1.0:
        from helpers.samples import resize_image, scaled_shape

        rgb = resize_image(rgb, scaled_shape((image_h, image_w), input_scale))
    h, w = rgb.shape[:2]
    if tile is None:
        tile = DEFAULT_TILE if h * w > AUTO_TILE_PIXELS else 0
    tile = int(tile)
    if tile < 0:
        raise ValueError(f"tile must be None, 0 (no tiling) or a tile size in pixels, got {tile}")
    tiled = tile > 0
    if tiled:
        needed = context_margin(module, stride)
        margin = (needed or 0) if margin is None else int(margin)
        if overlap is None:
            overlap = 0 if needed is not None and margin >= needed else DEFAULT_OVERLAP
        overlap = int(overlap)
        _check_tiling(tile, overlap, margin, stride)
        tile_hw = (tile, tile)
    else:
        overlap, margin = 0, 0
        tile_hw = (-(-h // stride) * stride, -(-w // stride) * stride)
    fast_cuda = bool(fast) and dev.type == "cuda"
    runner = module
    if fast and dev.type == "cpu":
        runner = _fast_cpu_model(module, rgb if calibration is None else calibration, calibration is None)
    was_training = module.training
    module.eval()
    try:
        if fast_cuda:
            module.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            cells, n_tiles = _predict_cells(rgb, runner, dev, stride, tile_hw, overlap, margin,
                                            fast_cuda or runner is not module, progress)
    finally:
        module.train(was_training)
    if not np.isfinite(cells).all():
        raise CrowdError(
            "The model produced NaN or infinite values; its weights are probably broken (a "
            "diverged training run). Use another checkpoint."
        )
    lowres = (cells / scale).astype(np.float32)
    total = float(lowres.sum(dtype=np.float64))
    if threshold is None:
        points = peaks_by_count(lowres, stride=stride)
    else:
        points = find_peaks(lowres, float(threshold), stride=stride)
    if len(points):  # a cell cut by the image border has its centre possibly outside the image
        points[:, 0] = np.minimum(points[:, 0], w - 0.5) * (image_w / w)
        points[:, 1] = np.minimum(points[:, 1], h - 0.5) * (image_h / h)
    return Prediction(
        count=total,
        density_lowres=lowres,
        points=points,
        seconds=time.perf_counter() - t0,
        tiled=n_tiles > 1,
        image_shape=(image_h, image_w),
        stride=stride,
        n_tiles=n_tiles,
        input_scale=input_scale,
        model_shape=(h, w),
    )


# --------------------------------------------------------------------------- command line


def _overlay_path(out_dir: Path, image_path: Path, used: set[Path]) -> Path:
    """``OUT/<stem>_density.png``, with ``_2``, ``_3``... when two inputs share a name."""
    target = out_dir / f"{image_path.stem}_density.png"
    n = 2
    while target in used:
        target = out_dir / f"{image_path.stem}_{n}_density.png"
        n += 1
    used.add(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.predict",
        description="Count people in images with a trained checkpoint; print one JSON line per "
        "image and save a density overlay PNG for each.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by helpers.train")
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
    args = parser.parse_args(argv)

    from helpers import config

    try:
        device = config.pick_device(args.device)
        model, info = load_cached_model(args.checkpoint, device)
        if args.tile is not None and args.tile > 0:
            stride = int(getattr(model, "output_stride", DEFAULT_STRIDE))
            _check_tiling(args.tile, args.overlap or 0, args.margin or 0, stride)
    except (CrowdError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.viz.predict import overlay_figure, save_png

    out_dir = Path(args.out) if args.out else config.project_root() / "build" / "predictions"
    status = 0
    used: set[Path] = set()
    for name in args.images:
        path = Path(name)
        try:
            t0 = time.perf_counter()
            image = load_image(path, max_pixels=args.max_pixels)
            pred = count(image, model, scale=info.scale, device=device, tile=args.tile,
                         overlap=args.overlap, margin=args.margin, threshold=args.threshold,
                         max_pixels=args.max_pixels, fast=args.fast, progress=sys.stderr.isatty())
            seconds = time.perf_counter() - t0
            fig = overlay_figure(image, pred.density_lowres, pred.count, title=path.name,
                                 points=pred.points)
            try:
                overlay = save_png(fig, _overlay_path(out_dir, path, used))
            finally:
                plt.close(fig)
        except (CrowdError, ValueError, OSError, RuntimeError, MemoryError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"path": str(path), "count": round(pred.count, 3),
                          "seconds": round(seconds, 3), "tiled": pred.tiled,
                          "overlay": str(overlay)}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
