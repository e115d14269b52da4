"""A synthetic crowd set, generated from a seed and written in the ShanghaiTech layout.

When no real dataset is available the whole series still runs, on crowds drawn by this module::

    <root>/part_A/{train,test}_data/images/IMG_<n>.jpg
    <root>/part_A/{train,test}_data/ground-truth/GT_IMG_<n>.mat     (same for part_B, n from 1)
    <root>/SYNTHETIC.json                                          (seed, version, sizes, counts)

The ``.mat`` files have the exact ShanghaiTech structure, so :mod:`helpers.data` reads them like
the real ones: ``loadmat(f)['image_info'][0, 0][0, 0][0]`` is the ``(N, 2)`` float64 ``(x, y)``
array and ``[...][1]`` is ``[[N]]``.

What a scene contains (:func:`render_scene`):

* people drawn as heads and shoulders: a hair-coloured head ellipse with a skin-toned face (or the
  back of the head), a hat now and then, over a torso blob in clothing colours;
* perspective: the head radius grows linearly with the image row, ``r(y) = r_top + b (y - y_top)``,
  so people are small and dense near the top and large near the bottom; the textured ground
  (paving, steps, asphalt, grass) follows the same horizon;
* clustered groups (a mixture of Gaussian clusters) plus people spread over the ground, placed with
  a minimum spacing so that nobody is completely hidden; drawn far to near (top rows first), so
  nearer people cover farther ones;
* head-sized distractors (balls, lamps, signs), buildings above the crowd in some Part A scenes,
  lighting gradients, vignetting, blur and sensor noise; saved as JPEG quality 90.

Part A is dense (about 60 to 600 people, widths 400 to 640 px; IMG_7, IMG_27, ... grayscale like the
real Part A); Part B is sparse (about 5 to 150 people, 512 x 384 px). The annotation point of a
person is the centre of the drawn head, in the pixel convention of :mod:`helpers.data`.

Every image has its own random stream (seed, part, split, index), so an image does not depend on
how many others are generated. Command line::

    crowd synth [--root R] [--seed S] [--force] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helpers import config, data
from helpers.errors import CrowdError
from helpers.tools.fileio import file_lock

#: Bump whenever the drawing or placement changes: an existing set with another version is rebuilt.
GENERATOR_VERSION = 1
MANIFEST_NAME = "SYNTHETIC.json"
PARTS = ("A", "B")
SPLITS = ("train", "test")
#: Images per split, the same in quick and full mode.
DEFAULT_SIZES: dict[str, int] = {
    "part_A/train": 60,
    "part_A/test": 30,
    "part_B/train": 60,
    "part_B/test": 30,
}
#: Head half-width over head half-height: heads are drawn as upright ellipses.
HEAD_ASPECT = 0.85
JPEG_QUALITY = 90
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: helpers.tools.synth".ljust(116)
_SHIFT = 4  # OpenCV fixed-point drawing: coordinates in 1/16 pixel
_ONE = 1 << _SHIFT


# --------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class PartStyle:
    """How the scenes of one part are drawn: sizes, counts, perspective and spacing.

    Counts are log-uniform in ``count``. The geometric mean ``m`` of the head radii at the top and
    the bottom of the crowd is ``sqrt(density * area / n)`` (``density`` = people per squared
    head radius on the ground) clipped to ``mean_radius``; ``perspective`` is the ratio of the
    bottom radius to the top radius.
    """

    name: str
    count: tuple[int, int]
    width: tuple[int, int]
    aspect: tuple[float, float]  # height / width
    density: tuple[float, float]
    mean_radius: tuple[float, float]  # px
    perspective: tuple[float, float]
    spacing: float  # minimum centre distance, in mean head radii of the pair
    clustered: tuple[float, float]  # fraction of people in groups
    open_top: float  # probability of a skyline (no people) above the crowd
    gray_every: int  # every n-th image stored as grayscale (0: never)
    min_radius: float = 1.6  # px


STYLES: dict[str, PartStyle] = {
    "A": PartStyle(
        name="A", count=(60, 600), width=(400, 640), aspect=(0.6, 0.85), density=(0.07, 0.12),
        mean_radius=(4.0, 14.0), perspective=(2.5, 6.0), spacing=1.55, clustered=(0.4, 0.9),
        open_top=0.45, gray_every=20,
    ),
    "B": PartStyle(
        name="B", count=(5, 150), width=(512, 512), aspect=(0.75, 0.75), density=(0.05, 0.1),
        mean_radius=(9.0, 17.0), perspective=(1.8, 3.2), spacing=2.1, clustered=(0.3, 0.8),
        open_top=0.0, gray_every=0,
    ),
}


def _style(style: PartStyle | str) -> PartStyle:
    if isinstance(style, PartStyle):
        return style
    key = str(style).upper().removeprefix("PART_")
    if key not in STYLES:
        raise ValueError(f"style must be 'A', 'B' or a PartStyle, not {style!r}")
    return STYLES[key]


# --------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """One rendered crowd image and its ground truth.

    ``image`` and ``background`` are ``H x W x 3`` uint8 RGB (``background`` is the same picture,
    lighting and noise without the people; None when not asked for). ``points`` are the
    ``(N, 2)`` float64 ``(x, y)`` head centres in draw order (far to near), ``radii`` the ``(N,)``
    vertical head half-axes in pixels (the head is the ellipse with half-axes ``HEAD_ASPECT * r``
    and ``r`` around the point).
    ``labels`` (only when asked for) is an ``H x W`` int32 map of what is in front: ``i + 1`` where
    the head of person ``i`` is visible, ``-1`` on bodies, 0 on the background.
    """

    image: np.ndarray
    points: np.ndarray
    radii: np.ndarray
    background: np.ndarray | None
    labels: np.ndarray | None = None
    gray: bool = False

    @property
    def count(self) -> int:
        return len(self.points)


@dataclass(frozen=True)
class _Perspective:
    """Head radius ``r(y) = r_top + slope * (y - y_top)`` for rows ``y_top <= y < height``."""

    y_top: float
    height: int
    r_top: float
    slope: float

    def radius(self, y: np.ndarray) -> np.ndarray:
        return self.r_top + self.slope * (np.asarray(y, dtype=np.float64) - self.y_top)

    @property
    def horizon(self) -> float:
        """The row where heads would shrink to nothing (above the crowd)."""
        return self.y_top - self.r_top / self.slope

    def sample_rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Rows of people spread uniformly over the ground: density proportional to ``1/r(y)^2``."""
        r_bottom = float(self.radius(self.height))
        u = rng.random(n)
        r = 1.0 / (1.0 / self.r_top - u * (1.0 / self.r_top - 1.0 / r_bottom))
        return self.y_top + (r - self.r_top) / self.slope


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    n_people: int,
    style: PartStyle | str = "A",
    *,
    with_labels: bool = False,
    with_background: bool = True,
) -> Scene:
    """Draw a crowd of about ``n_people`` on a ``height x width`` canvas.

    The returned scene holds exactly the people drawn; that can be fewer than ``n_people`` when
    they do not fit with the minimum spacing (rare: the head size is chosen from the count).
    ``with_labels`` adds the visibility map, ``with_background=False`` skips the empty picture
    (the image is the same either way).
    """
    import cv2

    st = _style(style)
    height, width, n_people = int(height), int(width), int(n_people)
    if height < 16 or width < 16 or n_people < 0:
        raise ValueError("render_scene needs height, width >= 16 and n_people >= 0")
    y_top = float(rng.uniform(0.12, 0.35) * height) if rng.random() < st.open_top else 0.0
    area = width * (height - y_top)
    density = rng.uniform(*st.density)
    ratio = rng.uniform(*st.perspective)
    mean_r = float(np.clip(np.sqrt(density * area / max(n_people, 1)), *st.mean_radius))
    r_top = max(mean_r / np.sqrt(ratio), st.min_radius)
    r_bottom = max(mean_r * np.sqrt(ratio), r_top * 1.2)
    persp = _Perspective(y_top, height, r_top, (r_bottom - r_top) / (height - y_top))

    background = _background(rng, height, width, persp)
    _draw_distractors(rng, background, persp)
    points, radii = _place_people(rng, n_people, width, persp, st)
    image = background.copy()
    labels = np.zeros((height, width), np.int32) if with_labels else None
    _draw_people(rng, image, points, radii, labels)

    # the same optics, lighting and noise for the picture and its empty background
    blur = rng.uniform(0.3, 0.9)
    light = _lighting(rng, height, width)
    noise = rng.standard_normal((height, width, 1), dtype=np.float32)  # luminance noise
    noise *= np.float32(rng.uniform(1.5, 5.0))
    finished = []
    for picture in (image, background) if with_background else (image,):
        out = cv2.GaussianBlur(picture, (0, 0), blur).astype(np.float32)
        out *= light
        out += noise
        np.clip(out, 0, 255, out=out)
        finished.append(np.rint(out, out=out).astype(np.uint8))
    image = finished[0]
    return Scene(image, points, radii, finished[1] if with_background else None, labels)


def _place_people(
    rng: np.random.Generator, n: int, width: int, persp: _Perspective, st: PartStyle
) -> tuple[np.ndarray, np.ndarray]:
    """Head centres ``(N, 2)`` and radii ``(N,)``: groups plus scattered people, far to near."""
    if n == 0:
        return np.zeros((0, 2)), np.zeros(0)
    height = persp.height
    n_groups = int(rng.integers(1, 7))
    centres = np.column_stack(
        [rng.uniform(0, width, n_groups), persp.sample_rows(rng, n_groups)]
    )
    spread = rng.uniform(3.0, 14.0, n_groups) * persp.radius(centres[:, 1])  # px, horizontal
    weights = rng.dirichlet(np.ones(n_groups))
    f_grouped = rng.uniform(*st.clustered)

    def candidates(m: int) -> np.ndarray:
        grouped = rng.random(m) < f_grouped
        g = rng.choice(n_groups, size=m, p=weights)
        xy = np.column_stack([rng.uniform(0, width, m), persp.sample_rows(rng, m)])
        offset = rng.normal(size=(m, 2)) * spread[g, None] * np.array([1.0, 0.45])
        xy[grouped] = centres[g[grouped]] + offset[grouped]
        ok = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= persp.y_top) & (xy[:, 1] < height)
        return xy[ok]

    px = np.empty(n)
    py = np.empty(n)
    pr = np.empty(n)
    k = 0
    spacing = st.spacing
    for _round in range(8):
        cand = candidates(4 * n + 16)
        rad = persp.radius(cand[:, 1]) * rng.uniform(0.88, 1.12, len(cand))
        half = 0.5 * spacing
        for x, y, r in zip(cand[:, 0].tolist(), cand[:, 1].tolist(), rad.tolist(), strict=True):
            if k:
                dx = px[:k] - x
                dy = py[:k] - y
                lim = half * (pr[:k] + r)
                if np.any(dx * dx + dy * dy < lim * lim):
                    continue
            px[k], py[k], pr[k] = x, y, r
            k += 1
            if k == n:
                break
        if k == n:
            break
        spacing *= 0.85  # crowded: let heads overlap a little more
    order = np.argsort(py[:k], kind="stable")
    points = np.column_stack([px[:k], py[:k]])[order]
    # keep the float64 pixel convention strict: 0 <= x < W, 0 <= y < H
    points[:, 0] = np.minimum(points[:, 0], np.nextafter(width, 0))
    points[:, 1] = np.minimum(points[:, 1], np.nextafter(height, 0))
    return points, pr[:k][order]


# ----------------------------------------------------------------------------- colours

_SKIN = np.array(
    [[255, 219, 180], [241, 194, 150], [224, 172, 120], [198, 140, 90], [160, 105, 65],
     [120, 75, 45], [90, 56, 36]], dtype=np.float64,
)
_HAIR = np.array(
    [[20, 16, 14], [35, 25, 20], [60, 40, 28], [95, 65, 40], [150, 110, 70], [200, 170, 120],
     [120, 120, 120], [190, 190, 185]], dtype=np.float64,
)
_HAIR_P = np.array([0.3, 0.25, 0.17, 0.1, 0.06, 0.04, 0.05, 0.03])


def _hsv_colours(rng: np.random.Generator, n: int, sat: tuple[float, float],
                 val: tuple[float, float]) -> np.ndarray:
    """``(n, 3)`` uint8 RGB colours with random hue and saturation/value in the given ranges."""
    import cv2

    if n == 0:
        return np.zeros((0, 3), np.uint8)
    hsv = np.column_stack([
        rng.uniform(0, 180, n), rng.uniform(*sat, n) * 255, rng.uniform(*val, n) * 255
    ]).astype(np.uint8)
    return cv2.cvtColor(hsv[:, None, :], cv2.COLOR_HSV2RGB)[:, 0, :]


def _fx(v: float) -> int:
    """A pixel-convention coordinate (pixel ``j`` covers ``[j, j+1)``) in OpenCV fixed point."""
    return int(round((v - 0.5) * _ONE))


def _fl(v: float) -> int:
    """A length in OpenCV fixed point."""
    return max(int(round(v * _ONE)), 1)


def _draw_people(rng: np.random.Generator, image: np.ndarray, points: np.ndarray,
                 radii: np.ndarray, labels: np.ndarray | None) -> None:
    """Draw heads and shoulders onto ``image`` in place, in the given (far to near) order."""
    import cv2

    n = len(points)
    if n == 0:
        return
    skin = _SKIN[rng.integers(0, len(_SKIN), n)] * rng.uniform(0.88, 1.1, (n, 1))
    hair = _HAIR[rng.choice(len(_HAIR), size=n, p=_HAIR_P)] * rng.uniform(0.8, 1.2, (n, 1))
    cloth = _hsv_colours(rng, n, (0.0, 0.75), (0.12, 0.9)).astype(np.float64)
    hats = _hsv_colours(rng, n, (0.3, 0.9), (0.3, 0.95)).astype(np.float64)
    skin, hair = np.clip(skin, 0, 255), np.clip(hair, 0, 255)
    facing = rng.random(n) < 0.65
    hat = rng.random(n) < 0.08
    lean = rng.uniform(-12, 12, n)
    body_w = rng.uniform(1.6, 2.1, n)
    aa = cv2.LINE_AA
    for i in range(n):
        x, y = points[i]
        r = float(radii[i])
        centre = (_fx(x), _fx(y))
        # torso (a tall ellipse) under wide shoulders that start just under the chin
        colour = cloth[i].tolist()
        torso_c = (_fx(x), _fx(y + 3.2 * r))
        torso_ax = (_fl(0.85 * body_w[i] * r), _fl(2.4 * r))
        shoulder_c = (_fx(x), _fx(y + 1.8 * r))
        shoulder_ax = (_fl(body_w[i] * r), _fl(0.85 * r))
        cv2.ellipse(image, torso_c, torso_ax, lean[i], 0, 360, colour, -1, aa, _SHIFT)
        cv2.ellipse(image, shoulder_c, shoulder_ax, lean[i], 0, 360, colour, -1, aa, _SHIFT)
        if r >= 4:  # a darker neckline/collar gives the shoulders some shape
            cv2.ellipse(image, (_fx(x), _fx(y + 0.95 * r)), (_fl(0.45 * r), _fl(0.3 * r)), 0, 0,
                        360, (0.6 * cloth[i]).tolist(), -1, aa, _SHIFT)
        head_ax = (_fl(HEAD_ASPECT * r), _fl(r))
        cv2.ellipse(image, centre, head_ax, 0, 0, 360, hair[i].tolist(), -1, aa, _SHIFT)
        if facing[i]:
            cv2.ellipse(image, (_fx(x), _fx(y + 0.18 * r)), (_fl(0.68 * r), _fl(0.76 * r)), 0, 0,
                        360, skin[i].tolist(), -1, aa, _SHIFT)
        if hat[i]:
            cv2.ellipse(image, (_fx(x), _fx(y - 0.2 * r)), (_fl(0.95 * r), _fl(0.85 * r)), 0, 180,
                        360, hats[i].tolist(), -1, aa, _SHIFT)
        if labels is not None:
            cv2.ellipse(labels, torso_c, torso_ax, lean[i], 0, 360, -1, -1, cv2.LINE_8, _SHIFT)
            cv2.ellipse(labels, shoulder_c, shoulder_ax, lean[i], 0, 360, -1, -1, cv2.LINE_8,
                        _SHIFT)
            cv2.ellipse(labels, centre, head_ax, 0, 0, 360, i + 1, -1, cv2.LINE_8, _SHIFT)


# ------------------------------------------------------------------------ backgrounds


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float,
                 octaves: int = 3) -> np.ndarray:
    """Smooth noise in about ``[-1, 1]``, ``H x W`` float32, features about ``cell`` px wide."""
    import cv2

    out = np.zeros((height, width), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        gh = max(int(height / cell) + 2, 2)
        gw = max(int(width / cell) + 2, 2)
        grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
        out += amp * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.5
        cell /= 2.0
    return out / total


def _ground_coords(rng: np.random.Generator, height: int, width: int,
                   persp: _Perspective) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-plane coordinates ``u`` (across) and ``v`` (depth) in tiles, and a fade for far tiles.

    ``u`` is measured in head radii of a person standing there, so tiles shrink exactly like people.
    """
    tile = rng.uniform(3.0, 9.0)  # tile width in head radii
    tilt = rng.uniform(0.35, 0.8)  # tile height / tile width at the bottom row
    ys = np.arange(height, dtype=np.float32) + 0.5
    xs = np.arange(width, dtype=np.float32) + 0.5
    dist = np.maximum(ys - persp.horizon, 1e-3)[:, None]
    r_row = persp.slope * dist
    dist_b = height - persp.horizon
    u = (xs[None, :] - rng.uniform(0, width)) / (r_row * tile)
    v = (dist_b**2 / (tilt * tile * float(persp.radius(height)))) / dist + rng.uniform(0, 1)
    tile_px = tile * r_row * tilt * dist / dist_b  # tile height in pixels at each row
    fade = np.clip((tile_px - 2.0) / 6.0, 0.0, 1.0)
    return u.astype(np.float32), np.broadcast_to(v, (height, width)).astype(np.float32), \
        np.broadcast_to(fade, (height, width)).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int,
                persp: _Perspective) -> np.ndarray:
    """A textured ground (paving, steps, asphalt or grass), with a skyline above the crowd."""
    kind = rng.choice(["paving", "steps", "asphalt", "grass", "plaza"], p=[0.3, 0.2, 0.2, 0.1, 0.2])
    if kind == "grass":
        base = _hsv_colours(rng, 1, (0.35, 0.7), (0.3, 0.6))[0]
        base = np.array([base[1] * 0.5, base[1], base[1] * 0.4])  # green
    elif kind == "steps":
        base = _hsv_colours(rng, 1, (0.1, 0.55), (0.3, 0.75))[0].astype(np.float64)
    else:
        base = _hsv_colours(rng, 1, (0.0, 0.35), (0.3, 0.85))[0].astype(np.float64)
    base = base.astype(np.float32)
    shade = 1.0 + 0.18 * _value_noise(rng, height, width, rng.uniform(40, 160))
    if kind in ("paving", "plaza", "steps"):
        u, v, fade = _ground_coords(rng, height, width, persp)
        if kind == "steps":
            frac = v - np.floor(v)
            pattern = 0.78 + 0.35 * frac - 0.3 * (frac < 0.08)
        else:
            table = rng.uniform(-1, 1, (64, 64)).astype(np.float32)
            iu = np.floor(u).astype(np.int64) % 64
            iv = np.floor(v).astype(np.int64) % 64
            line_w = rng.uniform(0.04, 0.1)
            grout = ((u - np.floor(u)) < line_w) | ((v - np.floor(v)) < line_w)
            if kind == "plaza":  # large slabs, little contrast
                pattern = 1.0 + 0.06 * table[iu, iv] - 0.15 * grout
            else:
                pattern = 1.0 + 0.14 * table[iu, iv] - 0.3 * grout
        shade = shade * (1.0 + (pattern - 1.0) * fade)
    else:
        grain = _value_noise(rng, height, width, rng.uniform(2, 6), octaves=2)
        shade = shade * (1.0 + (0.12 if kind == "asphalt" else 0.25) * grain)
    img = shade[:, :, None] * base[None, None, :]
    # a soft vertical gradient: the far ground is hazier
    haze = np.linspace(rng.uniform(0.0, 0.25), 0.0, height, dtype=np.float32)[:, None, None]
    img = img * (1 - haze) + haze * 200.0
    out = np.clip(img, 0, 255).astype(np.uint8)
    if persp.y_top >= 1:
        _skyline(rng, out, int(round(persp.y_top)))
    return out


def _skyline(rng: np.random.Generator, image: np.ndarray, rows: int) -> None:
    """Sky and buildings (with windows) over the top ``rows`` rows, in place."""
    import cv2

    width = image.shape[1]
    sky_top = _hsv_colours(rng, 1, (0.1, 0.5), (0.6, 1.0))[0].astype(np.float32)
    t = np.linspace(0, 1, rows, dtype=np.float32)[:, None, None]
    image[:rows] = np.clip(sky_top * (1 - t) + 210.0 * t, 0, 255).astype(np.uint8)
    x = -rng.uniform(0, 40)
    while x < width:
        bw = rng.uniform(0.08, 0.3) * width
        top = int(rng.uniform(0.0, 0.8) * rows)
        colour = _hsv_colours(rng, 1, (0.0, 0.3), (0.25, 0.8))[0].astype(np.float64)
        x0, x1 = int(x), int(x + bw)
        cv2.rectangle(image, (x0, top), (x1, rows), colour.tolist(), -1)
        win = max(int(rng.uniform(3, 8)), 2)
        win_colour = (colour * rng.uniform(0.4, 0.7)).tolist()
        for wy in range(top + win, rows - win, 2 * win):
            for wx in range(max(x0, 0) + win, min(x1, width) - win, 2 * win):
                cv2.rectangle(image, (wx, wy), (wx + win - 1, wy + win - 1), win_colour, -1)
        x += bw + rng.uniform(0, 20)


def _draw_distractors(rng: np.random.Generator, image: np.ndarray, persp: _Perspective) -> None:
    """Head-sized round things and signs on the ground, so that not every blob is a head."""
    import cv2

    height, width = image.shape[:2]
    n = int(rng.integers(0, 9))
    ys = persp.sample_rows(rng, n)
    colours = _hsv_colours(rng, n, (0.2, 1.0), (0.2, 1.0)).astype(np.float64)
    for i in range(n):
        x, y = rng.uniform(0, width), float(ys[i])
        r = float(persp.radius(y)) * rng.uniform(0.6, 2.0)
        if rng.random() < 0.6:
            cv2.ellipse(image, (_fx(x), _fx(y)), (_fl(r), _fl(r * rng.uniform(0.6, 1.0))), 0, 0,
                        360, colours[i].tolist(), -1, cv2.LINE_AA, _SHIFT)
        else:
            w, h = r * rng.uniform(0.6, 1.8), r * rng.uniform(0.6, 1.8)
            cv2.rectangle(image, (int(x - w), int(y - h)), (int(x + w), int(y + h)),
                          colours[i].tolist(), -1)


def _lighting(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A multiplicative ``H x W x 3`` float32 light field: gradient, vignette, colour cast."""
    ny = (np.arange(height, dtype=np.float32) / height - 0.5)[:, None]
    nx = (np.arange(width, dtype=np.float32) / width - 0.5)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    grad = 1.0 + 2 * rng.uniform(0.1, 0.35) * (float(np.cos(angle)) * nx + float(np.sin(angle)) * ny)
    vignette = 1.0 - 2 * rng.uniform(0.0, 0.35) * (nx**2 + ny**2)
    field = grad * vignette * rng.uniform(0.8, 1.12)
    cast = rng.uniform(0.92, 1.08, 3).astype(np.float32)
    return field[:, :, None] * cast[None, None, :]


# --------------------------------------------------------------------------- the data set


def image_rng(seed: int, part: str, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``IMG_<index>`` of ``part_<part>/<split>`` for ``seed``."""
    key = (PARTS.index(_style(part).name), SPLITS.index(split), int(index))
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def image_scene(part: str, split: str, index: int, seed: int = 0, *,
                with_labels: bool = False, with_background: bool = True) -> Scene:
    """The scene of ``part_<part>/<split>_data/images/IMG_<index>.jpg`` (index from 1).

    Exactly what :func:`generate` draws for that image (before the JPEG), with its radii.
    """
    st = _style(part)
    if index < 1:
        raise ValueError("image indices start at 1, like IMG_1.jpg")
    rng = image_rng(seed, st.name, split, index)
    width = int(rng.integers(st.width[0] // 8, st.width[1] // 8 + 1)) * 8
    height = int(round(width * rng.uniform(*st.aspect) / 8)) * 8
    lo, hi = np.log(st.count[0]), np.log(st.count[1])
    n_target = int(round(np.exp(rng.uniform(lo, hi))))
    scene = render_scene(rng, height, width, n_target, st, with_labels=with_labels,
                         with_background=with_background)
    scene.gray = bool(st.gray_every) and index % st.gray_every == 7
    return scene


def write_points_mat(path: str | Path, points: np.ndarray) -> None:
    """Write ``(N, 2)`` points as a ShanghaiTech ``GT_IMG_<n>.mat`` (``image_info`` cell/struct).

    ``image_info`` is a 1x1 cell holding a 1x1 struct with fields ``location`` (N x 2 double) and
    ``number`` ([[N]], stored as the smallest unsigned integer type, as in the original files).
    The 116-byte text header carries no date, so equal points give byte-identical files.
    """
    import io

    import scipy.io

    pts = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    number = np.array([[n]], dtype=np.uint8 if n <= 255 else np.uint16 if n <= 65535 else np.uint32)
    struct = np.empty((1, 1), dtype=[("location", object), ("number", object)])
    struct[0, 0]["location"] = pts
    struct[0, 0]["number"] = number
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = struct
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"image_info": cell}, format="5", do_compression=False)
    raw = bytearray(buffer.getvalue())
    raw[:116] = _MAT_HEADER
    Path(path).write_bytes(bytes(raw))


def _save_jpeg(path: Path, scene: Scene) -> None:
    from PIL import Image

    im = Image.fromarray(scene.image, "RGB")
    if scene.gray:
        im = im.convert("L")
    im.save(path, format="JPEG", quality=JPEG_QUALITY, optimize=False)


def _check_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    if sizes is None:
        return dict(DEFAULT_SIZES)
    out = {}
    for key, value in sizes.items():
        if key not in DEFAULT_SIZES:
            raise ValueError(f"sizes keys are {sorted(DEFAULT_SIZES)}, not {key!r}")
        if int(value) < 0:
            raise ValueError(f"sizes[{key!r}] must be >= 0")
        out[key] = int(value)
    return {key: out.get(key, 0) for key in DEFAULT_SIZES}


def _split_dirs(root: Path, key: str) -> tuple[Path, Path]:
    part, split = key.split("/")
    base = root / part / f"{split}_data"
    return base / "images", base / "ground-truth"


def generate(root: str | Path, seed: int = 0, *, sizes: Mapping[str, int] | None = None,
             progress: bool = True) -> dict:
    """Draw the whole set into ``root`` (created; files there are overwritten); return the manifest.

    ``sizes`` maps ``part_A/train`` etc. to image counts (default :data:`DEFAULT_SIZES`). The
    manifest (also written to ``root/SYNTHETIC.json``, last) records the seed, the generator
    version, the sizes and, per split, the head count of every image. Prefer
    :func:`ensure_synthetic`, which builds the set in a temporary folder and moves it into place.
    """
    from tqdm.auto import tqdm

    from helpers.tools.fileio import write_json_atomic

    root = Path(root)
    sizes = _check_sizes(sizes)
    start = time.perf_counter()
    counts: dict[str, dict] = {}
    gray: list[str] = []
    total = sum(sizes.values())
    with tqdm(total=total, desc="synthetic crowds", unit="img", disable=not progress) as bar:
        for key, n_images in sizes.items():
            part, split = key.split("/")
            images_dir, gt_dir = _split_dirs(root, key)
            images_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            per_image = []
            for index in range(1, n_images + 1):
                scene = image_scene(part[-1], split, index, seed, with_background=False)
                _save_jpeg(images_dir / f"IMG_{index}.jpg", scene)
                write_points_mat(gt_dir / f"GT_IMG_{index}.mat", scene.points)
                per_image.append(scene.count)
                if scene.gray:
                    gray.append(f"{key}/IMG_{index}")
                bar.update(1)
            counts[key] = {
                "images": n_images,
                "heads": int(sum(per_image)),
                "min": int(min(per_image, default=0)),
                "max": int(max(per_image, default=0)),
                "per_image": per_image,
            }
    manifest = {
        "generator": "helpers.tools.synth",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "sizes": sizes,
        "counts": counts,
        "grayscale": gray,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict | None:
    """The ``SYNTHETIC.json`` of ``root``, or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(root) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(root: str | Path, seed: int = 0, sizes: Mapping[str, int] | None = None) -> bool:
    """True when ``root`` holds the set for this seed, version and sizes, with every file present."""
    root = Path(root)
    sizes = _check_sizes(sizes)
    manifest = read_manifest(root)
    if not manifest or manifest.get("version") != GENERATOR_VERSION:
        return False
    if manifest.get("seed") != int(seed) or manifest.get("sizes") != sizes:
        return False
    for key, n_images in sizes.items():
        images_dir, gt_dir = _split_dirs(root, key)
        try:
            have_images = set(os.listdir(images_dir))
            have_gt = set(os.listdir(gt_dir))
        except OSError:
            return False
        want = range(1, n_images + 1)
        if any(f"IMG_{i}.jpg" not in have_images or f"GT_IMG_{i}.mat" not in have_gt for i in want):
            return False
        if len(have_images) != n_images:  # extra images would change what the reader lists
            return False
    return True




def ensure_synthetic(root: str | Path | None = None, seed: int = 0, *,
                     sizes: Mapping[str, int] | None = None, force: bool = False,
                     progress: bool = True) -> Path:
    """Return the synthetic set's root, generating it first if it is missing or out of date.

    ``root`` defaults to :func:`helpers.config.synthetic_root`. A complete set (see
    :func:`is_complete`) is returned at once without touching a file. Otherwise the set is drawn
    into a temporary sibling folder and renamed into place, so the root is never half-written;
    a lock file makes concurrent callers wait for one generation. An existing folder is only
    replaced if it is empty or holds a ``SYNTHETIC.json`` (it is never someone's real data).
    """
    root = Path(root) if root is not None else config.synthetic_root()
    root = root.expanduser().absolute()
    sizes = _check_sizes(sizes)
    if not force and is_complete(root, seed, sizes):
        return root
    parent = root.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CrowdError(
            f"Cannot create {parent} for the synthetic crowd set ({exc}). Pass another folder "
            "(crowd synth --root DIR) or set CROWD_HOME to a writable project folder."
        ) from exc
    try:
        with file_lock(parent / f".{root.name}.lock") as locked:
            if not force and is_complete(root, seed, sizes):
                return root  # another process finished it while we waited
            _check_replaceable(root)
            if locked:
                for stale in parent.glob(f".{root.name}.tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                generate(tmp, seed, sizes=sizes, progress=progress)
                if not force and is_complete(root, seed, sizes):
                    return root  # lost an unlocked race: keep the winner's identical set
                _swap_into_place(tmp, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise CrowdError(
            f"Could not write the synthetic crowd set to {root} ({exc}). Check the disk space and "
            "permissions, or pass another folder with --root."
        ) from exc
    return root


def _check_replaceable(root: Path) -> None:
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST_NAME).is_file():
        raise CrowdError(
            f"{root} exists and is not a synthetic crowd set (no {MANIFEST_NAME}); it will not be "
            "overwritten. Choose another folder (--root) or move that folder away."
        )
    if root.exists() and not root.is_dir():
        raise CrowdError(f"{root} exists and is a file, not a folder; choose another --root.")


def _swap_into_place(tmp: Path, root: Path) -> None:
    """Rename ``tmp`` to ``root``, moving any old ``root`` aside first and deleting it after."""
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(root, old)
    try:
        os.replace(tmp, root)
    except OSError:
        if old is not None and not root.exists():
            os.replace(old, root)  # put the previous set back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- CLI


def summary(root: str | Path) -> dict:
    """Root, seed and per-split image and head counts of a generated set (from its manifest)."""
    manifest = read_manifest(root) or {}
    counts = {
        key: {k: v for k, v in value.items() if k != "per_image"}
        for key, value in manifest.get("counts", {}).items()
    }
    return {"root": str(root), "seed": manifest.get("seed"), "version": manifest.get("version"),
            "counts": counts}


def ensure_dataset(root: str | Path | None = None) -> data.DataSource:
    """The dataset the series uses, with the synthetic set generated first when it is the one.

    The one call for notebooks, the trainer and the commands: :func:`helpers.data.resolve_data_source`
    (``root``, ``CROWD_DATA``, ``data/ShanghaiTech``, else the synthetic set), then
    :func:`ensure_synthetic` when the answer is the synthetic set.
    """
    source = data.resolve_data_source(root)
    if source.synthetic:
        ensure_synthetic(source.root, progress=False)
    return source


def banner(source: data.DataSource) -> str:
    """A Markdown banner for the top of a notebook saying which data is in use.

    Inputs:
    - source: DataSource from helpers.data.resolve_data_source or ensure_dataset
    Returns:
    - text: str, one Markdown paragraph
    """
    if source.synthetic:
        return ("**Running on SYNTHETIC crowds** (no ShanghaiTech dataset was found). Everything works "
                "and the numbers are real for this data, but they are not ShanghaiTech results. To use "
                "the real dataset, download it as described in `data/README.md` and set "
                "`CROWD_DATA=/path/to/ShanghaiTech` (the folder holding `part_A` and `part_B`) "
                f"before starting Jupyter. Synthetic set: `{source.root}`.")
    mode = "quick mode (`CROWD_QUICK=1`: small subsets)" if config.quick_mode() else "full mode"
    return f"Using **ShanghaiTech** at `{source.root}` (from {source.origin}), {mode}."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``crowd synth``."""
    parser.add_argument("--root", help="output folder (default: data/synthetic in the project)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Generate the set if needed and print its root and counts (plain lines or JSON)."""
    root = ensure_synthetic(args.root, args.seed, force=args.force, progress=not args.json)
    info = summary(root)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"root: {info['root']}")
    print(f"seed: {info['seed']}")
    for key, value in info["counts"].items():
        print(f"{key}: {value['images']} images, {value['heads']} heads "
              f"(min {value['min']}, max {value['max']} per image)")
    return 0
