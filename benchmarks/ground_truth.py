"""Benchmark: ground-truth density maps, ours against the original one-filter-per-head method.

Usage::

    python benchmarks/ground_truth.py [--part A] [--data ROOT] [--slow-heads 200]

Times :func:`helpers.density.density_map` on every image of a part (image sizes read from the
JPEG headers, points from the annotations), then the original MCNN/CSRNet method (one full-image
``scipy.ndimage.gaussian_filter`` per head, :func:`helpers.analysis.ground_truth.reference_density_map`) on the
first heads of a few of the same images, scaled per head. Both use the same sigmas, so the
difference measures only how kernels are placed; it is reported away from the borders, where
the original loses mass and ours does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from helpers import data
from helpers import density as dens
from helpers.analysis import ground_truth
from helpers.errors import CrowdError
from helpers.tools.synth import ensure_dataset


def run(part: str, root, split: str, slow_heads: int, slow_images: int, method: str) -> dict:
    source = ensure_dataset(root)
    splits = data.OFFICIAL_SPLITS if split == "all" else (split,)
    records = [r for s in splits for r in data.list_records(part, s, root=source.root)]
    params = dens.DensityParams(method=method)

    # ---- ours, whole part: read sizes and points, sigmas, maps (timed separately)
    t0 = time.perf_counter()
    items = []
    for record in records:
        height, width = data.image_size(record.image_path)
        points, _ = data.clean_points(data.read_points(record.points_path), (height, width))
        items.append((record, points, (height, width)))
    t_read = time.perf_counter() - t0

    t0 = time.perf_counter()
    sigmas = [dens.head_sigmas(points, params) for _, points, _ in items]
    t_sigma = time.perf_counter() - t0

    t0 = time.perf_counter()
    worst_count = 0.0
    for (_, points, shape), sig in zip(items, sigmas, strict=True):
        dmap = dens.density_from_sigmas(points, sig, shape, params.truncate)
        if len(points):
            err = abs(float(dmap.sum(dtype=np.float64)) - len(points)) / len(points)
            worst_count = max(worst_count, err)
    t_maps = time.perf_counter() - t0
    heads = sum(len(points) for _, points, _ in items)
    fast_seconds = t_sigma + t_maps

    # ---- the original method on a prefix of heads of a few images
    chosen = [i for i in range(len(items)) if len(items[i][1])]
    chosen = [chosen[j] for j in np.linspace(0, len(chosen) - 1, slow_images).round().astype(int)]
    per_image = max(1, slow_heads // len(chosen))
    slow_time = 0.0
    slow_count = 0
    worst_interior = 0.0
    worst_no_renorm = 0.0
    for i in chosen:
        _, points, shape = items[i]
        pts, sig = points[:per_image], sigmas[i][:per_image]
        t0 = time.perf_counter()
        ref = ground_truth.reference_density_map(pts, sig, shape, params.truncate)
        slow_time += time.perf_counter() - t0
        slow_count += len(pts)
        ours = dens.density_from_sigmas(pts, sig, shape, params.truncate)
        lossy = dens.density_from_sigmas(pts, sig, shape, params.truncate, renormalize=False)
        interior = ~ground_truth.truncated_support(pts, sig, shape, params.truncate)
        peak = float(ref.max())
        if interior.any():
            worst_interior = max(worst_interior, float(np.abs(ours - ref)[interior].max()) / peak)
        worst_no_renorm = max(worst_no_renorm, float(np.abs(lossy - ref).max()) / peak)

    fast_rate = heads / fast_seconds
    slow_rate = slow_count / slow_time
    return {
        "part": part,
        "split": split,
        "method": method,
        "root": str(source.root),
        "images": len(items),
        "heads": heads,
        "seconds_read_headers_points": round(t_read, 3),
        "seconds_sigmas": round(t_sigma, 3),
        "seconds_maps": round(t_maps, 3),
        "seconds_total": round(t_read + fast_seconds, 3),
        "heads_per_s": round(fast_rate, 1),
        "max_count_rel_error": worst_count,
        "slow_images": len(chosen),
        "slow_heads": slow_count,
        "slow_seconds": round(slow_time, 3),
        "slow_heads_per_s": round(slow_rate, 2),
        "slow_estimated_seconds_for_part": round(heads / slow_rate, 1),
        "speed_ratio": round(fast_rate / slow_rate, 1),
        "max_interior_diff_rel_peak": worst_interior,
        "max_diff_no_renorm_rel_peak": worst_no_renorm,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["A", "B"], default="A")
    parser.add_argument("--split", choices=["train", "test", "all"], default="all")
    parser.add_argument(
        "--data", help="dataset root (default: CROWD_DATA, data/ShanghaiTech or synthetic)"
    )
    parser.add_argument("--method", choices=list(dens.METHODS), default="adaptive")
    parser.add_argument(
        "--slow-heads", type=int, default=200, help="heads timed with the original method"
    )
    parser.add_argument("--slow-images", type=int, default=4, help="images those heads come from")
    args = parser.parse_args(argv)
    try:
        res = run(args.part, args.data, args.split, args.slow_heads, args.slow_images, args.method)
    except CrowdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"data: {res['root']} part {res['part']} ({res['split']}), {res['method']} sigmas")
    print(
        f"ours: {res['images']} images, {res['heads']} heads; headers+points "
        f"{res['seconds_read_headers_points']:.2f} s, sigmas {res['seconds_sigmas']:.2f} s, "
        f"maps {res['seconds_maps']:.2f} s -> {res['heads_per_s']:.0f} heads/s "
        f"(worst count error {res['max_count_rel_error']:.1e} relative)"
    )
    print(
        f"original (one gaussian_filter per head): {res['slow_heads']} heads on "
        f"{res['slow_images']} images in {res['slow_seconds']:.2f} s -> "
        f"{res['slow_heads_per_s']:.1f} heads/s (whole part: ~{res['slow_estimated_seconds_for_part'] / 60:.0f} min)"
    )
    print(f"speed ratio per head: {res['speed_ratio']:.0f}x")
    print(
        f"max |ours - original| away from borders: {res['max_interior_diff_rel_peak']:.1e} of peak; "
        f"with the original border handling, everywhere: {res['max_diff_no_renorm_rel_peak']:.1e}"
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
