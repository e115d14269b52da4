"""Training samples: ImageNet-normalised image tensors (3, h, w) and density targets (1, h/s, w/s)
at the model's output stride s (8), people per cell, or the head points (N, 2) of the sample.

The target is the full-resolution density cut to the pixels of the sample, then sum-pooled, so
``target.sum()`` is the number of people in it; points go through the same crop, flip and scaling.
``train`` mode: random crops, flips, rescaling (mass-preserving) and grayscale, a pure function of
``(seed, epoch, index)`` so a run resumes exactly; ``eval`` mode: whole images padded to a
multiple of s (mean colour, zero density). Memory and resampling choices: docs/data.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from helpers import data, density
from helpers.errors import CacheError

MODES = ("train", "eval")
TARGETS = ("density", "points")
DEFAULT_STRIDE = 8


@functools.lru_cache(maxsize=64)
def _area_matrix(n_in: int, n_out: int):
    """Sparse (n_out, n_in) matrix: the fraction of input cell j that output cell i covers (cell i
    spans [i * n_in / n_out, (i + 1) * n_in / n_out)); each column sums to 1, so mass is kept."""
    import scipy.sparse

    edges_out = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    cuts = np.union1d(np.arange(n_in + 1, dtype=np.float64), edges_out)
    cuts = cuts[(cuts >= 0) & (cuts <= n_in)]
    lo, hi = cuts[:-1], cuts[1:]
    keep = hi - lo > 1e-12
    lo, hi = lo[keep], hi[keep]
    mid = 0.5 * (lo + hi)
    col = np.minimum(np.floor(mid), n_in - 1).astype(np.int64)
    row = np.minimum(np.floor(mid * (n_out / n_in)), n_out - 1).astype(np.int64)
    return scipy.sparse.csr_matrix((hi - lo, (row, col)), shape=(n_out, n_in))


def resample_density(density: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a density map keeping its sum (area resampling by footprint overlap, up or down).

    Inputs:
    - density: float array (H, W)
    - shape: (H2, W2) ints >= 1
    Returns:
    - resampled: float32 array (H2, W2), same sum up to float rounding
    """
    density = np.asarray(density)
    h, w = density.shape
    h2, w2 = int(shape[0]), int(shape[1])
    if h2 < 1 or w2 < 1:
        raise ValueError(f"cannot resample a density to {shape}")
    if (h2, w2) == (h, w):
        return density.astype(np.float32, copy=True)
    rows = _area_matrix(h, h2) @ density.astype(np.float64)  # (h2, w)
    out = (_area_matrix(w, w2) @ rows.T).T  # (h2, w2)
    return np.ascontiguousarray(out, dtype=np.float32)


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an image (area interpolation when shrinking, bilinear when enlarging).

    Inputs:
    - image: uint8 array (H, W, 3); shape: (H2, W2) ints
    Returns:
    - resized: uint8 array (H2, W2, 3) (the input itself when the size is unchanged)
    """
    import cv2

    h, w = image.shape[:2]
    h2, w2 = int(shape[0]), int(shape[1])
    if (h2, w2) == (h, w):
        return image
    interp = cv2.INTER_AREA if h2 * w2 < h * w else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(image, (w2, h2), interpolation=interp))


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """The size of an image scaled by ``factor``.

    Inputs:
    - shape: (H, W, ...); factor: float
    Returns:
    - (round(H * factor), round(W * factor)), each at least 1
    """
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def normalize_image(image: np.ndarray) -> np.ndarray:
    """ImageNet normalisation: ``(x / 255 - mean) / std`` per channel, channels first.

    Inputs:
    - image: uint8 array (H, W, 3) RGB
    Returns:
    - normalised: float32 array (3, H, W)
    """
    from helpers.models import IMAGENET_MEAN, IMAGENET_STD

    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    chw = image.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255.0)
    return (chw - mean) / std


def _to_grayscale(image: np.ndarray) -> np.ndarray:
    """Luminance (0.299 R + 0.587 G + 0.114 B) repeated over three channels, uint8 (H, W, 3)."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return np.repeat(gray[:, :, None], 3, axis=2)


@dataclass(frozen=True)
class AugmentPlan:
    """The random choices for one training sample, all derived from ``(seed, epoch, index)``."""

    scale: float  # multiplies the (already resize-d) image size
    top: int  # crop position in the scaled image (0 when the image is smaller and gets padded)
    left: int
    flip: bool
    gray: bool


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample: independent of worker, process and history.

    Inputs:
    - seed, epoch, index: ints
    Returns:
    - rng: numpy Generator seeded by (seed, epoch, index)
    """
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x5A3])


def _scale_points(points: np.ndarray, shape: tuple[int, int], new_shape: tuple[int, int]) -> np.ndarray:
    """(x, y) points of an image of ``shape`` (H, W) on the same image resized to ``new_shape``."""
    return points * [new_shape[1] / shape[1], new_shape[0] / shape[0]]


def collate_points(batch):
    """DataLoader collate for ``targets="points"``.

    Inputs: batch: list of (image float32 (3, H, W), points float32 (N_i, 2)), images of one size
    Returns: images: float32 tensor (B, 3, H, W); points: list of B float32 tensors (N_i, 2)
    """
    return torch.stack([image for image, _ in batch]), [points for _, points in batch]


@dataclass
class _Base:
    image: np.ndarray  # H x W x 3 uint8 at the dataset's resize
    density: np.ndarray | None  # H x W float32, same size, sum = count (None for point targets)
    points: np.ndarray  # (count, 2) float64 (x, y) at the dataset's resize
    count: int


class CrowdDataset(Dataset):
    """Image / density-target pairs for training (random crops) or evaluation (whole images).

    Inputs:
    - records: list of ImageRecord (helpers.data.list_records), each with a points file
    - mode: "train" (random crops and augmentation) or "eval" (whole padded images)
    - crop: int, side of the square training crop in pixels (after resize), a multiple of stride
    - stride: int, the model's output stride (8 for both models of the series)
    - flip: bool, random horizontal flips with probability 1/2 (train mode)
    - rescale: (low, high) floats, range of random scale factors (train mode), or None
    - gray_prob: float, probability of turning a training sample to grayscale
    - resize: float, fixed scale applied to every image first (0.5 = half); counts unchanged
    - density_params: DensityParams, or None for geometry-adaptive kernels
    - cache_in_memory: bool, keep decoded images and densities in RAM (docs/data.md)
    - seed: int, base seed of the augmentation streams
    - density_fn: (record, params) -> (H, W) float32 full-resolution map; None computes it with
      helpers.density.compute_density (the trainer passes helpers.tools.cache.load_density)
    - targets: "density" (sum-pooled maps) or "points" (no density is computed; batch them with
      collate_points)
    Returns (ds[i] or ds[(epoch, i)]):
    - image: float32 tensor (3, h, w); target: float32 tensor (1, h / stride, w / stride), or
      points: float32 tensor (N, 2), the (x, y) heads inside the sample in its pixels
    """

    def __init__(
        self,
        records: Sequence[data.ImageRecord],
        mode: str = "train",
        *,
        crop: int = 256,
        stride: int = DEFAULT_STRIDE,
        flip: bool = True,
        rescale: tuple[float, float] | None = None,
        gray_prob: float = 0.0,
        resize: float = 1.0,
        density_params: density.DensityParams | None = None,
        cache_in_memory: bool = False,
        seed: int = 0,
        density_fn: Callable[[data.ImageRecord, density.DensityParams], np.ndarray] | None = None,
        targets: str = "density",
    ) -> None:
        rescale = None if rescale is None else (float(rescale[0]), float(rescale[1]))
        problems = {
            f"mode must be one of {MODES}, not {mode!r}": mode not in MODES,
            f"targets must be one of {TARGETS}, not {targets!r}": targets not in TARGETS,
            f"stride must be >= 1, got {stride}": stride < 1,
            f"crop ({crop}) must be a positive multiple of the stride ({stride})":
                mode == "train" and (crop < stride or crop % max(stride, 1) != 0),
            f"rescale must be (low, high) with 0 < low <= high, got {rescale}":
                rescale is not None and not 0 < rescale[0] <= rescale[1],
            f"gray_prob must be in [0, 1], got {gray_prob}": not 0.0 <= gray_prob <= 1.0,
            f"resize must be in (0, 4], got {resize}": not 0 < resize <= 4,
        }
        for message in (m for m, bad in problems.items() if bad):
            raise ValueError(message)
        self.records, self.mode, self.crop, self.stride = list(records), mode, int(crop), int(stride)
        self.flip, self.rescale, self.gray_prob = bool(flip), rescale, float(gray_prob)
        self.resize, self.seed, self.targets = float(resize), int(seed), targets
        self.density_params = density_params if density_params is not None else density.DensityParams()
        self.cache_in_memory = bool(cache_in_memory)
        self.density_fn = density_fn if density_fn is not None else density.compute_density
        self.epoch = 0
        self._cache: dict[int, _Base] = {}
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _load_base(self, index: int) -> _Base:
        """The image and its full-resolution density at the dataset's ``resize``."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        record = self.records[index]
        example = data.load_example(record)
        image, points, dmap = example.image, example.points, None
        if self.targets == "density":
            dmap = np.asarray(self.density_fn(record, self.density_params), dtype=np.float32)
            if dmap.shape != image.shape[:2]:
                raise CacheError(
                    f"Density map of {record.image_path} is {dmap.shape} but the image is "
                    f"{image.shape[:2]}; delete the density cache (CROWD_CACHE) and run again."
                )
        if self.resize != 1.0:
            shape = scaled_shape(image.shape[:2], self.resize)
            points = _scale_points(points, image.shape[:2], shape)
            image = resize_image(image, shape)
            dmap = None if dmap is None else resample_density(dmap, shape)
        base = _Base(image=image, density=dmap, points=points, count=example.count)
        self._counts[index] = example.count
        if self.cache_in_memory:
            self._cache[index] = base
        return base

    def preload(self, progress: bool = True) -> None:
        """Fill the in-memory cache now (no-op unless ``cache_in_memory``)."""
        if not self.cache_in_memory:
            return
        from tqdm.auto import tqdm

        missing = [i for i in range(len(self)) if i not in self._cache]
        for i in tqdm(missing, desc="caching images", unit="img", disable=not progress or not missing):
            self._load_base(i)

    def memory_bytes(self) -> int:
        """Bytes held by the in-memory cache right now."""
        return sum(b.image.nbytes + b.points.nbytes + (b.density.nbytes if b.density is not None else 0)
                   for b in self._cache.values())

    def true_count(self, index: int) -> int:
        """Number of annotated heads of image ``index`` (after the point policy of helpers.data)."""
        if index not in self._counts:  # reads the annotation and the image header only
            self._counts[index] = len(density.record_points(self.records[index])[0])
        return self._counts[index]

    def plan(self, index: int, epoch: int | None = None, shape: tuple[int, int] | None = None) -> AugmentPlan:
        """The augmentation of sample ``index`` in ``epoch`` (train mode); ``shape`` is the image
        size after ``resize`` (read from the image when omitted)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if shape is None:
            shape = self._load_base(index).image.shape[:2]
        rng = sample_rng(self.seed, epoch, index)
        u_scale, u_top, u_left, u_flip, u_gray = rng.random(5)
        scale = 1.0
        if self.rescale is not None:
            lo, hi = self.rescale
            scale = float(lo + (hi - lo) * u_scale)
        h, w = scaled_shape(shape, scale) if scale != 1.0 else shape
        top = int(u_top * (h - self.crop + 1)) if h > self.crop else 0
        left = int(u_left * (w - self.crop + 1)) if w > self.crop else 0
        return AugmentPlan(scale, top, left, self.flip and u_flip < 0.5, u_gray < self.gray_prob)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``ds[i]`` (epoch ``ds.epoch``) or ``ds[(epoch, i)]`` -> ``(image, target or points)``."""
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} images")
        base = self._load_base(index)
        if self.mode == "eval":
            image, dmap, points = self._eval_sample(base)
        else:
            image, dmap, points = self._train_sample(base, self.plan(index, epoch, base.image.shape[:2]))
        if self.targets == "points":
            return torch.from_numpy(image), torch.from_numpy(np.asarray(points, dtype=np.float32))
        target = density.downsample_density(dmap, self.stride)
        return torch.from_numpy(image), torch.from_numpy(np.ascontiguousarray(target, np.float32)[None])

    def _eval_sample(self, base: _Base) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        h, w = base.image.shape[:2]
        s = self.stride
        ph, pw = -(-h // s) * s, -(-w // s) * s
        image = np.zeros((3, ph, pw), dtype=np.float32)  # 0 = ImageNet mean colour
        image[:, :h, :w] = normalize_image(base.image)
        density = None if base.density is None else np.zeros((ph, pw), dtype=np.float32)
        if density is not None:
            density[:h, :w] = base.density
        return image, density, base.points

    def _train_sample(self, base: _Base, plan: AugmentPlan) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        img, den, pts = base.image, base.density, base.points
        if plan.scale != 1.0:
            shape = scaled_shape(img.shape[:2], plan.scale)
            pts = _scale_points(pts, img.shape[:2], shape)
            img = resize_image(img, shape)
            den = None if den is None else resample_density(den, shape)
        c, rows, cols = self.crop, slice(plan.top, plan.top + self.crop), slice(plan.left, plan.left + self.crop)
        img_c = img[rows, cols]
        hc, wc = img_c.shape[:2]
        pts = pts - [plan.left, plan.top]  # a new array: the base's points are not touched
        pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < wc) & (pts[:, 1] >= 0) & (pts[:, 1] < hc)]
        if plan.flip:  # pixel column j -> wc - 1 - j, so x -> wc - x
            img_c, pts[:, 0] = img_c[:, ::-1], wc - pts[:, 0]
        if plan.gray:
            img_c = _to_grayscale(img_c)
        image = np.zeros((3, c, c), dtype=np.float32)  # padding: ImageNet mean colour
        image[:, :hc, :wc] = normalize_image(np.ascontiguousarray(img_c))
        density = None if den is None else np.zeros((c, c), dtype=np.float32)  # padding: no people
        if density is not None:
            density[:hc, :wc] = den[rows, cols][:, ::-1] if plan.flip else den[rows, cols]
        return image, density, pts

    def __repr__(self) -> str:
        extra = f", crop={self.crop}" if self.mode == "train" else ""
        return (f"CrowdDataset({len(self)} images, mode={self.mode!r}{extra}, stride={self.stride}, "
                f"resize={self.resize}, cache_in_memory={self.cache_in_memory})")
