"""Reference points for a crowd counter: a constant guess, a pedestrian detector, published numbers.

A trained density regressor is only impressive next to something simpler. Both baselines here are
*predictors* in the sense of :mod:`helpers.tools.evaluate` (``image -> (count, density, points)``), so
they are scored by exactly the same code as the networks:

* :class:`MeanCountBaseline`: predict the mean count of the training images for every image.
  Any model worth training must beat its MAE; on ShanghaiTech it is large because the counts
  spread widely (Part B: 9 to 578 people per image).
* :class:`HogPeopleDetector`: count the people a classic pedestrian detector finds (Dalal and
  Triggs' histograms of oriented gradients with a linear SVM, as shipped with OpenCV). It shows
  why crowd counting became density regression: detection works for a few large, separate,
  upright people and collapses in crowds.

:data:`PUBLISHED_RESULTS` lists what well-known papers report on ShanghaiTech (published numbers,
not reproduced here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from helpers.errors import CrowdError

# --------------------------------------------------------------------------- mean count


@dataclass
class MeanCountBaseline:
    """Predict the same count, the mean of the fit images, for every image.

    ``fit(records)`` reads only the annotations (and image sizes, for the point policy of
    :func:`helpers.data.clean_points`), never the pixels. The predicted density is a uniform map
    ``H x W`` whose sum is that count (so GAME spreads the guess evenly over the image); there are
    no head points.
    """

    mean_count: float | None = None
    n_fit: int = 0

    def fit(self, records: Sequence) -> MeanCountBaseline:
        """Set :attr:`mean_count` to the mean number of annotated heads of ``records``."""
        from helpers.data import clean_points, image_size, read_points
        from helpers.errors import AnnotationError

        counts = []
        for record in records:
            if record.points_path is None:
                raise AnnotationError(f"No annotation found for {record.image_path}; cannot fit the mean count.")
            points = read_points(record.points_path)
            counts.append(len(clean_points(points, image_size(record.image_path))[0]))
        return self.fit_counts(counts)

    def fit_counts(self, counts: Iterable[float]) -> MeanCountBaseline:
        """Set :attr:`mean_count` from a list of per-image counts."""
        values = np.asarray(list(counts), dtype=np.float64)
        if values.size == 0:
            raise CrowdError("The mean-count baseline needs at least one training image to fit.")
        self.mean_count = float(values.mean())
        self.n_fit = int(values.size)
        return self

    def __call__(self, image: np.ndarray) -> tuple[float, np.ndarray, None]:
        """``(mean_count, uniform H x W float32 density summing to it, None)``."""
        if self.mean_count is None:
            raise CrowdError("Call fit(records) on the mean-count baseline before predicting.")
        h, w = np.asarray(image).shape[:2]
        density = np.full((h, w), self.mean_count / (h * w), dtype=np.float32)
        return self.mean_count, density, None


# --------------------------------------------------------------------------- HOG detector


def _hog_class():
    """OpenCV's ``HOGDescriptor`` class, or None when this OpenCV build has none."""
    import cv2

    for holder in (cv2, getattr(cv2, "xobjdetect", None)):
        cls = getattr(holder, "HOGDescriptor", None) if holder is not None else None
        if cls is not None:
            return cls
    return None


def hog_available() -> bool:
    """True when the installed OpenCV has the HOG people detector (OpenCV 4.x has it)."""
    return _hog_class() is not None


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, highest score first.

    ``boxes``: ``(K, 4)`` ``(x, y, w, h)`` pixels; ``scores``: ``(K,)``. A box is dropped when
    its intersection over union with an already kept box is above ``iou``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        iw = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        ih = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        overlap = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


@dataclass
class HogPeopleDetector:
    """Count people with OpenCV's HOG pedestrian detector (Dalal and Triggs, CVPR 2005).

    The detector slides a 64 x 128 pixel window over an image pyramid, describes each window by
    histograms of gradient orientations and scores it with a linear SVM trained on upright,
    fully visible pedestrians (``HOGDescriptor.getDefaultPeopleDetector()``, built into OpenCV 4,
    nothing to download). Here: windows scoring above ``hit_threshold`` are kept, overlapping
    windows are merged by non-maximum suppression (IoU above ``nms_iou``), and every remaining
    box is one person. The count is the number of boxes.

    Head points: each box's top centre moved down by ``head_offset`` of its height. The
    training windows have about 16 of their 128 pixels of margin above the head (1/8 of the
    height), and the head's centre is a little lower still: on 16 Part B ``fit`` images the
    annotated head nearest the top of a detected box lay at a median 0.15 of the box height
    below its top, hence the default 0.15 (about 23 pixels in the smallest, 156-pixel box). Density: a Gaussian of
    ``sigma`` pixels per head point (:func:`helpers.density.density_map`), so GAME and the
    localization scores are computed as for a network.

    Why it fails in dense crowds:

    * **Size.** The window is 64 x 128 pixels for a whole body; the pyramid only shrinks the
      image, so nobody shorter than about 100 pixels can be found. In ShanghaiTech Part A most
      heads are 5 to 20 pixels wide and the bodies are a few dozen pixels tall; in Part B the
      far half of the street is too small as well. ``upscale`` enlarges the image first (2 finds
      people of 64 pixels) at ``upscale^2`` times the cost.
    * **Occlusion.** The SVM learned the silhouette of a whole upright person (head, shoulders,
      legs). In a crowd only heads and shoulders are visible; bodies hide each other.
    * **Merging.** Neighbours' boxes overlap strongly and non-maximum suppression merges them
      into one, so even people that are found are under-counted.

    Speed: about 0.5 s for a 1024 x 768 image on one CPU core (``win_stride`` 8, ``scale``
    1.05); ``upscale=2`` takes about four times longer.

    Needs OpenCV 4 (``opencv-python-headless>=4.8,<5``): OpenCV 5 moved ``HOGDescriptor`` out of
    the main package. :meth:`check_available` raises a :class:`CrowdError` saying so.
    """

    win_stride: tuple[int, int] = (8, 8)
    padding: tuple[int, int] = (8, 8)
    scale: float = 1.05
    hit_threshold: float = 0.0
    nms_iou: float = 0.3
    upscale: float = 1.0
    head_offset: float = 0.15
    sigma: float = 8.0
    _hog: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.scale > 1.0:
            raise ValueError(f"scale (pyramid step) must be > 1, got {self.scale}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {self.nms_iou}")
        if not 0.25 <= self.upscale <= 4.0:
            raise ValueError(f"upscale must be in [0.25, 4], got {self.upscale}")
        if not 0.0 <= self.head_offset <= 1.0:
            raise ValueError(f"head_offset must be a fraction of the box height in [0, 1], got {self.head_offset}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0 pixels, got {self.sigma}")
        self.win_stride = (int(self.win_stride[0]), int(self.win_stride[1]))
        self.padding = (int(self.padding[0]), int(self.padding[1]))

    @staticmethod
    def check_available() -> None:
        """Raise :class:`CrowdError` when this OpenCV has no HOG people detector."""
        if not hog_available():
            import cv2

            raise CrowdError(
                f"OpenCV {cv2.__version__} has no HOG people detector: OpenCV 5 moved HOGDescriptor "
                "out of the main package. Install OpenCV 4 to use this baseline: "
                "pip install 'opencv-python-headless>=4.8,<5'."
            )

    def settings(self) -> dict[str, Any]:
        """The detector's parameters as plain data (for result files)."""
        return {
            "win_stride": list(self.win_stride), "padding": list(self.padding), "scale": self.scale,
            "hit_threshold": self.hit_threshold, "nms_iou": self.nms_iou, "upscale": self.upscale,
            "head_offset": self.head_offset, "sigma": self.sigma,
        }

    def _descriptor(self):
        if self._hog is None:
            self.check_available()
            cls = _hog_class()
            hog = cls()
            getter = getattr(cls, "getDefaultPeopleDetector", None)
            if getter is None:
                import cv2

                getter = cv2.HOGDescriptor_getDefaultPeopleDetector
            hog.setSVMDetector(getter())
            self._hog = hog
        return self._hog

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """People boxes ``(K, 4)`` float64 ``(x, y, w, h)`` in image pixels and their SVM scores.

        Boxes are after non-maximum suppression, highest score first, clipped to the image.
        """
        import cv2

        img = np.ascontiguousarray(np.asarray(image))
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image must be H x W x 3 uint8, got {img.shape} {img.dtype}")
        h, w = img.shape[:2]
        work = img
        if self.upscale != 1.0:
            size = (max(1, round(w * self.upscale)), max(1, round(h * self.upscale)))
            interp = cv2.INTER_LINEAR if self.upscale > 1 else cv2.INTER_AREA
            work = cv2.resize(img, size, interpolation=interp)
        empty = np.zeros((0, 4)), np.zeros(0)
        if work.shape[0] < 128 or work.shape[1] < 64:
            return empty  # smaller than one detection window
        rects, weights = self._descriptor().detectMultiScale(
            work, hitThreshold=float(self.hit_threshold), winStride=self.win_stride,
            padding=self.padding, scale=float(self.scale), groupThreshold=0,
        )
        if len(rects) == 0:
            return empty
        boxes = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(weights, dtype=np.float64).reshape(-1)
        keep = non_max_suppression(boxes, scores, self.nms_iou)
        boxes, scores = boxes[keep] / float(self.upscale), scores[keep]
        # clip to the image
        x0 = np.clip(boxes[:, 0], 0, w)
        y0 = np.clip(boxes[:, 1], 0, h)
        x1 = np.clip(boxes[:, 0] + boxes[:, 2], 0, w)
        y1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, h)
        return np.column_stack([x0, y0, x1 - x0, y1 - y0]), scores

    def head_points(self, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """``(K, 2)`` head estimates ``(x, y)``: top centre plus ``head_offset`` of the height.

        Moved inside the image (``0 <= x < W``, ``0 <= y < H``).
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        h, w = int(shape[0]), int(shape[1])
        x = boxes[:, 0] + boxes[:, 2] / 2
        y = boxes[:, 1] + self.head_offset * boxes[:, 3]
        eps = 1e-6
        return np.column_stack([np.clip(x, 0, w - eps), np.clip(y, 0, h - eps)])

    def __call__(self, image: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """``(count, H x W float32 density, (K, 2) head points)`` for one ``H x W x 3`` uint8 image."""
        from helpers.density import DensityParams, density_map

        boxes, _ = self.detect(image)
        shape = np.asarray(image).shape[:2]
        points = self.head_points(boxes, shape)
        density = density_map(points, shape, DensityParams("fixed", sigma=self.sigma))
        return float(len(points)), density, points


# --------------------------------------------------------------------------- published numbers


@dataclass(frozen=True)
class PublishedResult:
    """A number a paper reports on ShanghaiTech (published, not reproduced here).

    ``mse`` is the paper's column "MSE", which is the root mean squared error (our ``rmse``).
    """

    method: str
    venue: str
    part: str
    mae: float
    mse: float
    reference: str

    @property
    def label(self) -> str:
        return f"{self.method} ({self.venue}), published"


_MCNN = ("Y. Zhang, D. Zhou, S. Chen, S. Gao, Y. Ma. Single-Image Crowd Counting via Multi-Column "
         "Convolutional Neural Network. CVPR 2016.")
_CSRNET = ("Y. Li, X. Zhang, D. Chen. CSRNet: Dilated Convolutional Neural Networks for Understanding "
           "the Highly Congested Scenes. CVPR 2018.")
_DMCOUNT = "B. Wang, H. Liu, D. Samaras, M. Hoai. Distribution Matching for Crowd Counting. NeurIPS 2020."
_P2PNET = ("Q. Song et al. Rethinking Counting and Localization in Crowds: A Purely Point-Based "
           "Framework. ICCV 2021.")

#: Test-set MAE and "MSE" (root mean squared error) as printed in the papers; not reproduced here.
PUBLISHED_RESULTS: tuple[PublishedResult, ...] = (
    PublishedResult("MCNN", "CVPR 2016", "A", 110.2, 173.2, _MCNN),
    PublishedResult("MCNN", "CVPR 2016", "B", 26.4, 41.3, _MCNN),
    PublishedResult("CSRNet", "CVPR 2018", "A", 68.2, 115.0, _CSRNET),
    PublishedResult("CSRNet", "CVPR 2018", "B", 10.6, 16.0, _CSRNET),
    PublishedResult("DM-Count", "NeurIPS 2020", "A", 59.7, 95.7, _DMCOUNT),
    PublishedResult("DM-Count", "NeurIPS 2020", "B", 7.4, 11.8, _DMCOUNT),
    PublishedResult("P2PNet", "ICCV 2021", "A", 52.74, 85.06, _P2PNET),
    PublishedResult("P2PNet", "ICCV 2021", "B", 6.25, 9.9, _P2PNET),
)


def published(part: str) -> list[PublishedResult]:
    """The :data:`PUBLISHED_RESULTS` of ShanghaiTech part ``A`` or ``B``."""
    p = str(part).upper().removeprefix("PART_")
    if p not in ("A", "B"):
        raise ValueError(f"part must be 'A' or 'B', not {part!r}")
    return [r for r in PUBLISHED_RESULTS if r.part == p]


def published_summaries(part: str) -> dict[str, dict[str, Any]]:
    """Published rows in the summary format of :mod:`helpers.tools.evaluate` (for ``results_table``).

    ``{label: {"mae", "rmse", "images": None, "published": True, "reference"}}``; GAME and
    localization are not reported by these papers and stay empty.
    """
    return {
        r.label: {"model": r.label, "mae": r.mae, "rmse": r.mse, "images": None, "game": None,
                  "localization": None, "published": True, "reference": r.reference}
        for r in published(part)
    }
