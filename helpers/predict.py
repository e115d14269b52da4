"""Counting the people in one image with a trained network: the whole image, or exact tiles.

:func:`count` does what you can do by hand (notebook 06): resize the image to the scale the model
was trained at, ImageNet-normalise it, pad it at the bottom and right to a multiple of the stride
``s = 8`` with zeros after normalisation (the mean colour), run the network, divide its cell map
by the density scale, and sum. Above :data:`AUTO_TILE_PIXELS` the image is cut into tiles, each
run with a context margin from the receptive field (:func:`context_margin`) of which only the
tile's own cells are kept: the tiled map then equals the whole-image map up to float rounding.
Checkpoint paths, the fast path (int8, float16), blended overlapping tiles and the ``crowd
predict`` command are in :mod:`helpers.tools.inference`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from helpers.errors import CrowdError, ImageReadError

#: Images with more pixels than this (after resizing) are tiled automatically (2.5 MP).
AUTO_TILE_PIXELS = 2_500_000
#: Default tile side (px): CSRNet float32 peaks at 1.6 GB on a 4000 x 3000 photo (benchmarks/).
DEFAULT_TILE = 768
#: Largest image accepted (pixels), as for reading dataset images (helpers.data).
MAX_PIXELS = 100_000_000
#: Output stride assumed for a model without an ``output_stride`` attribute.
DEFAULT_STRIDE = 8


@dataclass(eq=False)
class Prediction:
    """The result of :func:`count` for one image of ``image_shape = (H, W)`` pixels:

    - count: float, predicted number of people (the sum of ``density_lowres``)
    - density_lowres: float32 (ceil(h / s), ceil(w / s)), people per s x s cell of the resized
      ``model_shape = (h, w)`` image the model saw (stride s)
    - points: float64 (M, 2), head positions (x, y) in pixels of the original image
    - density (computed on first access): float32 (H, W), people per original pixel; sums to count
    - seconds: wall time of the call; tiled, n_tiles: whether it was cut and into how many tiles
    - input_scale: the resize factor applied before inference
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
        """float32 (H, W) people per pixel of the original image, summing to ``count``."""
        from helpers.samples import resample_density

        model_shape = self.model_shape or self.image_shape
        dense = upsample_density(self.density_lowres, model_shape, self.stride)
        if tuple(model_shape) != tuple(self.image_shape):
            dense = resample_density(dense, self.image_shape)
        return dense


def upsample_density(lowres: np.ndarray, image_shape: Sequence[int], stride: int = DEFAULT_STRIDE) -> np.ndarray:
    """Spread a cell map over the image: cell (i, j) shares its people evenly among its pixels
    [i s, (i+1) s) x [j s, (j+1) s) inside the image, so block sums give the cells back.

    Inputs:
    - lowres: float array (ceil(H / s), ceil(W / s)), people per cell
    - image_shape: (H, W) of the image, pixels
    - stride: int s, pixels per cell side

    Returns:
    - density: float32 array (H, W), people per pixel
    """
    h, w, s = int(image_shape[0]), int(image_shape[1]), int(stride)
    ch, cw = -(-h // s), -(-w // s)
    if np.shape(lowres) != (ch, cw):
        raise ValueError(f"a {h}x{w} image at stride {s} has a {ch}x{cw} cell map, got {np.shape(lowres)}")
    rows_in = np.minimum(s, h - np.arange(ch) * s)  # image rows in each row of cells
    cols_in = np.minimum(s, w - np.arange(cw) * s)
    per_pixel = (np.asarray(lowres, np.float64) / np.outer(rows_in, cols_in)).astype(np.float32)
    return np.ascontiguousarray(per_pixel[np.arange(h) // s][:, np.arange(w) // s])


def load_image(image: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file (EXIF rotation applied, as a phone shows it) or an RGB array, as RGB.

    Inputs:
    - image: a path, or a uint8 array (H, W, 3) RGB (other arrays and PIL images:
      :func:`helpers.tools.inference.as_rgb_uint8`)
    - max_pixels: int, larger images are refused

    Returns:
    - rgb: uint8 array (H, W, 3)
    """
    from helpers.data import megapixels, read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image, max_pixels=max_pixels, exif_orientation=True)
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        what = f"shape {image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageReadError(f"Expected an image path or a uint8 H x W x 3 RGB array, got {what}; "
                             "convert other images with helpers.tools.inference.as_rgb_uint8.")
    h, w = image.shape[:2]
    if h * w == 0:
        raise ImageReadError(f"The image array is empty ({h} x {w} pixels).")
    if h * w > max_pixels:
        raise ImageReadError(f"The image array is {w}x{h} = {megapixels(w * h)}, over the limit of "
                             f"{megapixels(max_pixels)}. Downscale it first, or raise max_pixels.")
    return image


def prepare_image(image: np.ndarray, input_scale: float = 1.0, stride: int = DEFAULT_STRIDE):
    """The network's input for an RGB image: resized, ImageNet-normalised, padded to the stride.

    Inputs:
    - image: uint8 array (H, W, 3) RGB
    - input_scale: float, resize factor (the scale the model was trained at) giving (h, w)
    - stride: int s, the padded sides are multiples of it

    Returns:
    - x: float32 tensor (1, 3, ceil(h / s) s, ceil(w / s) s); the padding is 0, the mean colour
    """
    import torch

    from helpers.samples import normalize_image, resize_image, scaled_shape

    if input_scale != 1.0:
        image = resize_image(image, scaled_shape(image.shape[:2], input_scale))
    normalised = normalize_image(image)  # (3, h, w) float32
    h, w = normalised.shape[1:]
    x = torch.zeros(1, 3, -(-h // stride) * stride, -(-w // stride) * stride)
    x[0, :, :h, :w] = torch.from_numpy(normalised)
    return x


def context_margin(model, stride: int = DEFAULT_STRIDE) -> int | None:
    """Pixels of context a tile needs on each side for its cells to equal the whole image's.

    Cell i sees pixels start + i jump +- (rf - 1) / 2 (:func:`helpers.models.receptive_field`): the
    larger of its reaches before and after the cell, rounded up to a multiple of the stride.

    Inputs:
    - model: nn.Module, a chain of convolutions and poolings (HeatmapCNN, CSRNet)
    - stride: int, the margin is a multiple of it

    Returns:
    - margin: int pixels (80 for HeatmapCNN, 144 for CSRNet), or None if it cannot be worked out
    """
    from helpers.models import receptive_field

    try:
        rows = receptive_field(model)
    except (ValueError, TypeError):
        return None
    if not rows:
        return None
    last = rows[-1]
    half = (last.rf - 1) / 2
    need = max(half - last.start, last.start + half - (last.jump - 1), 0.0)
    return int(np.ceil(need / stride - 1e-9)) * stride


def check_tiling(tile: int, margin: int, stride: int) -> None:
    """Raise ValueError unless tile > 0 and margin >= 0 are multiples of the model's stride.

    Inputs:
    - tile, margin: int pixels; stride: int, the model's output stride
    Returns: None
    """
    if tile < stride or tile % stride:
        raise ValueError(f"tile must be a positive multiple of the model's stride {stride}, got {tile}")
    if margin < 0 or margin % stride:
        raise ValueError(f"margin must be a multiple of the stride {stride} and >= 0, got {margin}")


def forward_cells(model, x, stride: int = DEFAULT_STRIDE, device=None) -> np.ndarray:
    """Run the network on one prepared input.

    Inputs:
    - model: nn.Module mapping (1, 3, H, W) to (1, 1, H / s, W / s)
    - x: float32 tensor (1, 3, H, W) from :func:`prepare_image`
    - stride: int s, the model's output stride (checked); device: where to run (default: x's)

    Returns:
    - cells: float64 array (H / s, W / s), the model's output (people x scale per cell)
    """
    out = model(x if device is None else x.to(device))
    expected = (1, 1, x.shape[2] // stride, x.shape[3] // stride)
    if tuple(out.shape) != expected:
        raise ValueError(f"the model returned a {tuple(out.shape)} map for a {tuple(x.shape)} input; "
                         f"expected {expected} at output stride {stride}")
    return out[0, 0].float().cpu().numpy().astype(np.float64)


def predict_tiles(model, image: np.ndarray, tile: int, margin: int, stride: int = DEFAULT_STRIDE,
                  device=None, progress: bool = False) -> tuple[np.ndarray, int]:
    """The cell map of an image computed tile by tile, each tile with a context margin.

    Tiles of tile x tile pixels, each run with margin more pixels of the image on every side
    (less at the border); only the tile's own cells are kept.

    Inputs:
    - model: nn.Module as in :func:`forward_cells`
    - image: uint8 array (h, w, 3) RGB, already resized
    - tile, margin: int pixels, multiples of the stride (:func:`check_tiling`)
    - stride, device, progress: the model's stride, where to run it, show a progress bar

    Returns:
    - cells: float64 array (ceil(h / s), ceil(w / s)), model output per cell
    - n_tiles: int, number of forward passes
    """
    from tqdm.auto import tqdm

    h, w = image.shape[:2]
    s = stride
    cells = np.zeros((-(-h // s), -(-w // s)))
    corners = [(y, x) for y in range(0, h, tile) for x in range(0, w, tile)]
    for y0, x0 in tqdm(corners, desc="tiles", leave=False, disable=not progress or len(corners) < 2):
        wy0, wx0 = max(0, y0 - margin), max(0, x0 - margin)
        window = image[wy0 : y0 + tile + margin, wx0 : x0 + tile + margin]
        out = forward_cells(model, prepare_image(window, 1.0, s), s, device)
        ry, rx = (y0 - wy0) // s, (x0 - wx0) // s
        own = out[ry : ry + tile // s, rx : rx + tile // s]
        cells[y0 // s : y0 // s + own.shape[0], x0 // s : x0 // s + own.shape[1]] = own
    return cells, len(corners)


def prediction_from_cells(cells: np.ndarray, scale: float, image_shape: Sequence[int],
                          model_shape: Sequence[int], stride: int = DEFAULT_STRIDE,
                          threshold: float | None = None, n_tiles: int = 1, seconds: float = 0.0,
                          input_scale: float = 1.0, refine: bool = False) -> Prediction:
    """Turn the network's cell map into a :class:`Prediction`: divide by the scale, find heads.

    Inputs:
    - cells: float array (ceil(h / s), ceil(w / s)), model output (people x scale per cell)
    - scale: float, the density scale the model was trained with
    - image_shape, model_shape: (H, W) of the original image and (h, w) of the resized one
    - stride: int s, pixels per cell side of the resized image
    - threshold: None = the round(count) strongest local maxima are heads (metrics.peaks_by_count);
      a number = every local maximum above it, people per cell (metrics.find_peaks)
    - refine: bool, each head at the mass-weighted centroid of its 3 x 3 cells, not a cell centre
    - n_tiles, seconds, input_scale: recorded in the result

    Returns:
    - prediction: :class:`Prediction`
    """
    from helpers.metrics import find_peaks, peaks_by_count

    if not np.isfinite(cells).all():
        raise CrowdError("The model produced NaN or infinite values; its weights are probably "
                         "broken (a diverged training run). Use another checkpoint.")
    lowres = (np.asarray(cells) / scale).astype(np.float32)
    if threshold is None:
        points = peaks_by_count(lowres, stride=stride, refine=refine)
    else:
        points = find_peaks(lowres, float(threshold), stride=stride, refine=refine)
    (big_h, big_w), (h, w) = image_shape[:2], model_shape[:2]
    if len(points):  # a cell cut by the image border may have its centre outside the image
        points[:, 0] = np.minimum(points[:, 0], w - 0.5) * (big_w / w)
        points[:, 1] = np.minimum(points[:, 1], h - 0.5) * (big_h / h)
    return Prediction(count=float(lowres.sum(dtype=np.float64)), density_lowres=lowres,
                      points=points, seconds=seconds, tiled=n_tiles > 1,
                      image_shape=(int(big_h), int(big_w)), stride=stride, n_tiles=n_tiles,
                      input_scale=input_scale, model_shape=(int(h), int(w)))


def count(image: Any, model, *, scale: float | None = None, input_scale: float | None = None,
          device: Any = None, tile: int | None = None, margin: int | None = None,
          threshold: float | None = None, refine: bool = False, max_pixels: int = MAX_PIXELS,
          progress: bool = False) -> Prediction:
    """Predict the number of people in one image (the method: module docstring).

    Inputs:
    - image: a path or a uint8 array (H, W, 3) RGB (:func:`load_image`)
    - model: nn.Module returning (1, 1, H/s, W/s) people x scale for a (1, 3, H, W) input
    - scale: float, default the model's ``density_scale`` attribute, else 1.0
    - input_scale: float resize factor, default the model's ``input_scale`` attribute, else 1.0
    - device: where to run (the model is moved there); default where its parameters are
    - tile: None = tiles of DEFAULT_TILE above AUTO_TILE_PIXELS, 0 = whole image, N = tiles of N px
    - margin: context pixels around each tile, default :func:`context_margin` (exact tiles)
    - threshold, refine: how heads are picked and placed (:func:`prediction_from_cells`)
    - max_pixels: int, larger images are refused; progress: bool, a progress bar over the tiles
    Returns:
    - prediction: :class:`Prediction` (count, cell map, head points, ...)
    """
    import torch

    from helpers.samples import resize_image, scaled_shape

    t0 = time.perf_counter()
    rgb = load_image(image, max_pixels)
    scale = float(getattr(model, "density_scale", 1.0) if scale is None else scale)
    input_scale = float(getattr(model, "input_scale", 1.0) if input_scale is None else input_scale)
    if not (np.isfinite(scale) and scale > 0 and np.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"scale and input_scale must be positive numbers, got {scale}, {input_scale}")
    if device is not None:
        model.to(device)
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device(device or "cpu")
    stride = int(getattr(model, "output_stride", DEFAULT_STRIDE))
    rgb_in = rgb if input_scale == 1.0 else resize_image(rgb, scaled_shape(rgb.shape[:2], input_scale))
    h, w = rgb_in.shape[:2]
    tile = (DEFAULT_TILE if h * w > AUTO_TILE_PIXELS else 0) if tile is None else int(tile)
    if tile:
        margin = (context_margin(model, stride) or 0) if margin is None else int(margin)
        check_tiling(tile, margin, stride)
    was_training = model.training
    model.eval()  # for the call; the previous mode is restored below
    try:
        with torch.inference_mode():
            if tile:
                cells, n_tiles = predict_tiles(model, rgb_in, tile, margin, stride, dev, progress)
            else:
                cells, n_tiles = forward_cells(model, prepare_image(rgb_in, 1.0, stride), stride, dev), 1
    finally:
        model.train(was_training)
    return prediction_from_cells(cells, scale, rgb.shape[:2], (h, w), stride, threshold, n_tiles,
                                 time.perf_counter() - t0, input_scale, refine)
