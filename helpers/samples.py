"""Training samples: image tensors and density targets at the model's stride, counts kept exact.

A :class:`CrowdDataset` turns a list of :class:`helpers.data.ImageRecord` into pairs::

    image   (3, h, w)          float32, ImageNet-normalised ((x / 255 - mean) / std)
    target  (1, h / s, w / s)  float32 density at the model's output stride s (8), people per cell

``h`` and ``w`` are multiples of ``s``. The target is always made the same way: take the
full-resolution density (whose sum is the number of heads), cut out exactly the pixels the image
sample shows, then sum-pool ``s x s`` blocks with :func:`helpers.density.downsample_density`.
Summing blocks loses nothing, so ``target.sum()`` is the number of people in the sample, up to
float32 rounding.

Two modes:

``train``
    random ``crop x crop`` windows, random horizontal flips, optional random rescaling (the image is
    resized and the density resampled with exact mass preservation, see :func:`resample_density`)
    and optional grayscale conversion. Images smaller than the crop are padded at the bottom and
    right (after the flip, so padding is always there); the padding is the ImageNet mean colour
    (exactly 0 after normalisation) with zero density.
``eval``
    whole images, padded at the bottom and right to a multiple of ``s`` (same padding), so the
    target holds every head. :meth:`CrowdDataset.true_count` gives the number of annotated heads
    for MAE / RMSE.

``resize`` trains and evaluates at a reduced resolution (0.5 = half width and height): the image is
resized and the density resampled with mass preservation, so the count does not change. The
full-resolution map is resampled rather than rendered again from scaled points: kernel widths then
shrink exactly as the heads do, and the HDF5 cache of full-resolution maps
(:func:`helpers.density.load_density`) serves every resolution.

Augmentation randomness is a pure function of ``(seed, epoch, index)``: sample ``i`` of epoch
``e`` is the same whichever worker process makes it and whatever ran before, which is what lets an
interrupted training run resume exactly. Index a dataset with ``ds[(epoch, i)]`` or set
``ds.epoch`` and use ``ds[i]``.

Memory of ``cache_in_memory=True`` (decoded images and full-resolution densities kept in RAM):
a pixel costs 3 bytes of uint8 image plus 4 bytes of float32 density. A ShanghaiTech Part B image
(768 x 1024) is therefore 5.5 MB, and the 360 ``fit`` images take 1.98 GB at full resolution and
0.50 GB at ``resize=0.5`` (4x fewer pixels); the 270 Part A ``fit`` images (0.5 MP on average)
take 1.03 GB and 0.26 GB (measured with :meth:`CrowdDataset.memory_bytes`, which reports the real
figure). The validation images add 10 %. With DataLoader worker processes the cache is filled once
in the main process before the workers start (:func:`make_loader` calls
:meth:`CrowdDataset.preload`); on Linux the workers share those pages, on macOS and Windows each
worker receives a copy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:  # pragma: no cover - typing only
    from helpers.data import ImageRecord
    from helpers.density import DensityParams

MODES = ("train", "eval")
DEFAULT_STRIDE = 8


# --------------------------------------------------------------------------- resampling


@functools.lru_cache(maxsize=64)
def _area_matrix(n_in: int, n_out: int):
    """Sparse ``(n_out, n_in)`` matrix: output cell i gets the fraction of input cell j it covers.

    Output cell ``i`` spans ``[i * n_in / n_out, (i + 1) * n_in / n_out)`` in input pixels. Every
    input pixel is shared out completely (each column sums to 1), so the total is preserved.
    """
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
    """Resample an ``H x W`` density to ``shape = (H2, W2)`` keeping its sum exactly.

    Area resampling: each output cell receives each input pixel's mass in proportion to the
    overlap of their footprints (the density analogue of ``cv2.INTER_AREA``). Works for up- and
    down-scaling; the total is unchanged up to float rounding. Returns float32.
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
    """Resize an ``H x W x 3`` uint8 image to ``shape = (H2, W2)`` (area when shrinking)."""
    import cv2

    h, w = image.shape[:2]
    h2, w2 = int(shape[0]), int(shape[1])
    if (h2, w2) == (h, w):
        return image
    shrink = h2 * w2 < h * w
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(image, (w2, h2), interpolation=interp))


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(round(H * f), round(W * f))``, at least 1 x 1."""
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def normalize_image(image: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 RGB -> ``3 x H x W`` float32 ImageNet-normalised."""
    from helpers.models import IMAGENET_MEAN, IMAGENET_STD

    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    chw = image.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255.0)
    return (chw - mean) / std


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """Luminance (0.299 R + 0.587 G + 0.114 B) repeated over three channels, uint8."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return np.repeat(gray[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------- augmentation plan


@dataclass(frozen=True)
class AugmentPlan:
    """The random choices for one training sample, all derived from ``(seed, epoch, index)``.

    ``scale`` multiplies the (already ``resize``-d) image size; ``top``/``left`` place the crop in
    the scaled image (0 when the image is smaller than the crop and gets padded).
    """

    scale: float
    top: int
    left: int
    flip: bool
    gray: bool


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample: independent of worker, process and history."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x5A3])


# --------------------------------------------------------------------------- dataset


@dataclass
class _Base:
    image: np.ndarray  # H x W x 3 uint8 at the dataset's resize
    density: np.ndarray  # H x W float32, same size, sum = count
    count: int


class CrowdDataset(Dataset):
    """Image / density-target pairs for training (random crops) or evaluation (whole images).

    Parameters
    ----------
    records : the images (from :func:`helpers.data.list_records`), each with a points file.
    mode : ``"train"`` (random crops and augmentation) or ``"eval"`` (whole padded images).
    crop : side of the square training crop in pixels (after ``resize``); a multiple of ``stride``.
    stride : the model's output stride (8 for both models of the series).
    flip : random horizontal flips with probability 1/2 (train mode).
    rescale : ``(low, high)`` range of random scale factors (train mode), or None for none.
    gray_prob : probability of converting a training sample to grayscale.
    resize : fixed scale applied to every image first (0.5 = half resolution); counts unchanged.
    density_params : how ground-truth densities are made (default: geometry-adaptive kernels).
    cache_in_memory : keep decoded images and densities in RAM (see the module docstring).
    seed : base seed of the augmentation streams.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        mode: str = "train",
        *,
        crop: int = 256,
        stride: int = DEFAULT_STRIDE,
        flip: bool = True,
        rescale: tuple[float, float] | None = None,
        gray_prob: float = 0.0,
        resize: float = 1.0,
        density_params: DensityParams | None = None,
        cache_in_memory: bool = False,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if mode == "train" and (crop < stride or crop % stride):
            raise ValueError(f"crop ({crop}) must be a positive multiple of the stride ({stride})")
        if rescale is not None:
            lo, hi = float(rescale[0]), float(rescale[1])
            if not 0 < lo <= hi:
                raise ValueError(f"rescale must be (low, high) with 0 < low <= high, got {rescale}")
            rescale = (lo, hi)
        if not 0.0 <= gray_prob <= 1.0:
            raise ValueError(f"gray_prob must be in [0, 1], got {gray_prob}")
        if not 0 < resize <= 4:
            raise ValueError(f"resize must be in (0, 4], got {resize}")
        if density_params is None:
            from helpers.density import DensityParams

            density_params = DensityParams()
        self.records = list(records)
        self.mode = mode
        self.crop = int(crop)
        self.stride = int(stride)
        self.flip = bool(flip)
        self.rescale = rescale
        self.gray_prob = float(gray_prob)
        self.resize = float(resize)
        self.density_params = density_params
        self.cache_in_memory = bool(cache_in_memory)
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[int, _Base] = {}
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    # ----------------------------------------------------------------- loading

    def _load_base(self, index: int) -> _Base:
        """The image and its full-resolution density at the dataset's ``resize``."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        from helpers.data import load_example
        from helpers.density import load_density

        record = self.records[index]
        example = load_example(record)
        density = np.asarray(load_density(record, self.density_params), dtype=np.float32)
        image = example.image
        if density.shape != image.shape[:2]:
            from helpers.errors import CacheError

            raise CacheError(
                f"Density map of {record.image_path} is {density.shape} but the image is "
                f"{image.shape[:2]}; delete the density cache (CROWD_CACHE) and run again."
            )
        if self.resize != 1.0:
            shape = scaled_shape(image.shape[:2], self.resize)
            image = resize_image(image, shape)
            density = resample_density(density, shape)
        base = _Base(image=image, density=density, count=example.count)
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
        return sum(b.image.nbytes + b.density.nbytes for b in self._cache.values())

    def true_count(self, index: int) -> int:
        """Number of annotated heads of image ``index`` (after the point policy of helpers.data)."""
        if index not in self._counts:
            from helpers.data import clean_points, image_size, read_points

            record = self.records[index]
            if record.points_path is None:
                from helpers.data import missing_annotation

                raise missing_annotation(record.image_path)
            points = read_points(record.points_path)
            self._counts[index] = len(clean_points(points, image_size(record.image_path))[0])
        return self._counts[index]

    # ----------------------------------------------------------------- sampling

    def plan(self, index: int, epoch: int | None = None, shape: tuple[int, int] | None = None) -> AugmentPlan:
        """The augmentation of sample ``index`` in ``epoch`` (train mode).

        ``shape`` is the image size after ``resize`` (read from the image when omitted).
        """
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
        return AugmentPlan(
            scale=scale,
            top=top,
            left=left,
            flip=self.flip and u_flip < 0.5,
            gray=u_gray < self.gray_prob,
        )

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``ds[i]`` (epoch ``ds.epoch``) or ``ds[(epoch, i)]`` -> ``(image, target)`` tensors."""
        if isinstance(key, tuple):
            epoch, index = int(key[0]), int(key[1])
        else:
            epoch, index = self.epoch, int(key)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} images")
        base = self._load_base(index)
        if self.mode == "eval":
            image, density = self._eval_sample(base)
        else:
            image, density = self._train_sample(base, self.plan(index, epoch, base.image.shape[:2]))
        from helpers.density import downsample_density

        target = downsample_density(density, self.stride)
        return torch.from_numpy(image), torch.from_numpy(np.ascontiguousarray(target, np.float32)[None])

    def _eval_sample(self, base: _Base) -> tuple[np.ndarray, np.ndarray]:
        h, w = base.image.shape[:2]
        s = self.stride
        ph, pw = -(-h // s) * s, -(-w // s) * s
        image = np.zeros((3, ph, pw), dtype=np.float32)  # 0 = ImageNet mean colour
        image[:, :h, :w] = normalize_image(base.image)
        density = np.zeros((ph, pw), dtype=np.float32)
        density[:h, :w] = base.density
        return image, density

    def _train_sample(self, base: _Base, plan: AugmentPlan) -> tuple[np.ndarray, np.ndarray]:
        img, den = base.image, base.density
        if plan.scale != 1.0:
            shape = scaled_shape(img.shape[:2], plan.scale)
            img = resize_image(img, shape)
            den = resample_density(den, shape)
        c = self.crop
        img_c = img[plan.top : plan.top + c, plan.left : plan.left + c]
        den_c = den[plan.top : plan.top + c, plan.left : plan.left + c]
        if plan.flip:
            img_c = img_c[:, ::-1]
            den_c = den_c[:, ::-1]
        if plan.gray:
            img_c = to_grayscale(img_c)
        hc, wc = den_c.shape
        image = np.zeros((3, c, c), dtype=np.float32)  # padding: ImageNet mean colour
        image[:, :hc, :wc] = normalize_image(np.ascontiguousarray(img_c))
        density = np.zeros((c, c), dtype=np.float32)  # padding: no people
        density[:hc, :wc] = den_c
        return image, density

    def __repr__(self) -> str:
        extra = f", crop={self.crop}" if self.mode == "train" else ""
        return (
            f"CrowdDataset({len(self)} images, mode={self.mode!r}{extra}, stride={self.stride}, "
            f"resize={self.resize}, cache_in_memory={self.cache_in_memory})"
        )
