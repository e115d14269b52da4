"""The HDF5 cache of ground-truth density maps, and the ``crowd density build`` command.

Maps are stored one HDF5 file per image under
``cache_root()/density/<dataset id>/<params key>/<path in the dataset>.h5``, never inside the
dataset (which may be read-only). A file is fresh when its format version, density parameters and
the size and modification time of the image and annotation match; stale or damaged files are
rebuilt. Files are written atomically (:mod:`helpers.tools.fileio`).
:func:`load_density` has the ``density_fn(record, params)`` signature of
:class:`helpers.samples.CrowdDataset`.

Command line::

    crowd density build [--part A|B] [--split train|test|all] [--method adaptive|fixed]
                        [--sigma S] [--beta B] [--k K] [--root ROOT] [--workers N]

prints a JSON summary: images built, rebuilt because stale, skipped because fresh, heads, seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from helpers import config, data
from helpers.density import METHODS, DensityParams, density_map, record_points
from helpers.errors import AnnotationError, CacheError, CrowdError, ImageReadError
from helpers.tools.messages import one_line

#: Bump when the way maps are computed or stored changes: older cache files are then rebuilt.
FORMAT_VERSION = 1
#: HDF5 storage of cached maps: lzf with byte shuffling, in chunks of 64 full rows. Measured on
#: ShanghaiTech maps: files are about 0.6 of the raw float32 size (gzip level 1: 0.56, plain lzf:
#: 0.75), writing costs about 20 ms and reading about 5 ms per map (uncompressed: 1 ms), which
#: saves over 1 GB for the two parts at a read cost far below decoding the JPEG.
COMPRESSION = {"compression": "lzf", "shuffle": True}
CHUNK_ROWS = 64
DEFAULT_PARAMS = DensityParams()
PARAM_NAMES = ("method", "sigma", "beta", "k", "truncate", "min_sigma", "max_sigma")


# --------------------------------------------------------------------------- parameters


def _num(value: float) -> str:
    """A float written exactly and stably for file names (``repr``: 0.3 -> '0.3')."""
    return repr(float(value))


def params_key(params: DensityParams) -> str:
    """A stable, readable name for density parameters (cache folder names).

    Only what changes the maps is included: ``beta`` and ``k`` do not matter for ``fixed``.
    Numbers are written exactly (``repr``), so different parameters never share a key.
    """
    if params.method == "fixed":
        parts = ["fixed", f"s{_num(params.sigma)}"]
    else:
        parts = ["adaptive", f"k{int(params.k)}", f"b{_num(params.beta)}", f"s{_num(params.sigma)}"]
    parts.append(f"t{_num(params.truncate)}")
    if params.min_sigma is not None:
        parts.append(f"min{_num(params.min_sigma)}")
    if params.max_sigma is not None:
        parts.append(f"max{_num(params.max_sigma)}")
    return "_".join(parts)


def params_to_attrs(params: DensityParams) -> dict[str, str | float | int]:
    """The parameters as HDF5-storable scalars; an unset clamp is stored as ``"none"``."""
    attrs: dict[str, str | float | int] = {}
    for name, value in asdict(params).items():
        if value is None:
            attrs[name] = "none"
        elif name == "method":
            attrs[name] = str(value)
        else:
            attrs[name] = int(value) if name == "k" else float(value)
    return attrs


def params_from_attrs(attrs) -> DensityParams:
    """Inverse of :func:`params_to_attrs` (extra keys are ignored)."""
    values = {}
    for name in PARAM_NAMES:
        value = attrs[name]
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value == "none":
            value = None
        elif name == "method":
            value = str(value)
        else:
            value = int(value) if name == "k" else float(value)
        values[name] = value
    return DensityParams(**values)


# --------------------------------------------------------------------------- cache



def dataset_root_of(record) -> Path:
    """The dataset folder a record belongs to.

    ShanghaiTech layout ``ROOT/part_X/<split>_data/images/IMG.jpg`` gives ``ROOT``; any other
    image (a folder of the user's own) gives its own folder.
    """
    image = Path(record.image_path).expanduser().resolve()
    parents = image.parents
    if (
        len(parents) >= 4
        and parents[0].name == "images"
        and parents[1].name.endswith("_data")
        and parents[2].name.lower().startswith("part_")
    ):
        return parents[3]
    return image.parent


def dataset_id(root: str | Path) -> str:
    """A short folder name for a dataset root: its name plus a hash of its full path."""
    root = Path(root).expanduser().resolve()
    digest = hashlib.sha1(str(root).encode("utf-8")).hexdigest()[:8]
    return f"{root.name or 'root'}-{digest}"


def cache_dir_for(
    params: DensityParams, root: str | Path, cache_dir: str | Path | None = None
) -> Path:
    """The folder holding the maps of one dataset under one set of parameters."""
    base = Path(cache_dir) if cache_dir is not None else config.cache_root() / "density"
    return base / dataset_id(root) / params_key(params)


def cache_path(
    record, params: DensityParams = DEFAULT_PARAMS, cache_dir: str | Path | None = None
) -> Path:
    """Where a record's map is cached: ``<cache>/density/<dataset id>/<params key>/<rel>.h5``.

    ``<rel>`` is the image's path inside the dataset with ``.h5`` appended
    (``part_A/train_data/images/IMG_1.jpg.h5``). ``cache_dir`` replaces
    ``helpers.config.cache_root() / "density"`` (set ``CROWD_CACHE`` to move the whole cache).
    """
    root = dataset_root_of(record)
    rel = Path(record.image_path).expanduser().resolve().relative_to(root)
    return cache_dir_for(params, root, cache_dir) / rel.parent / f"{rel.name}.h5"


def _source_attrs(record) -> dict[str, str | int]:
    """Paths, sizes and modification times of a record's files: a change means rebuild."""
    attrs: dict[str, str | int] = {}
    for prefix, path in (("annotation", record.points_path), ("image", record.image_path)):
        if path is None:
            raise data.missing_annotation(record.image_path, " (a density map needs head points)")
        path = Path(path).expanduser().resolve()
        try:
            stat = path.stat()
        except OSError as exc:
            error = ImageReadError if prefix == "image" else AnnotationError
            raise error(f"{path} cannot be read ({exc}). Check that the file exists.") from exc
        attrs[f"{prefix}_path"] = str(path)
        attrs[f"{prefix}_mtime_ns"] = int(stat.st_mtime_ns)
        attrs[f"{prefix}_bytes"] = int(stat.st_size)
    return attrs


def _expected_attrs(record, params: DensityParams) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {"format_version": FORMAT_VERSION, "params_key": params_key(params)}
    attrs.update(_source_attrs(record))
    return attrs


def _attr_equal(stored, wanted) -> bool:
    if isinstance(stored, bytes):
        stored = stored.decode()
    if isinstance(wanted, str):
        return isinstance(stored, str) and stored == wanted
    try:
        return int(stored) == int(wanted)
    except (TypeError, ValueError):
        return False


def _read_cached(path: Path, expected: dict, load: bool) -> tuple[str, np.ndarray | None, int]:
    """``(status, map or None, n_points)`` with status ``missing``, ``stale`` or ``fresh``."""
    if not path.is_file():
        return "missing", None, 0
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            attrs = fh.attrs
            if any(
                name not in attrs or not _attr_equal(attrs[name], value)
                for name, value in expected.items()
            ):
                return "stale", None, 0
            dset = fh["density"]
            if dset.dtype != np.float32 or dset.shape != (
                int(attrs["height"]),
                int(attrs["width"]),
            ):
                return "stale", None, 0
            n_points = int(attrs["n_points"])
            if not load:
                return "fresh", None, n_points
            density = dset[()]
    except Exception:  # noqa: BLE001 - any unreadable file (truncated, garbage, wrong layout) is stale
        return "stale", None, 0
    return "fresh", density, n_points


def cache_status(
    record, params: DensityParams = DEFAULT_PARAMS, cache_dir: str | Path | None = None
) -> str:
    """``"fresh"``, ``"stale"`` (parameters, annotation or file damaged) or ``"missing"``."""
    status, _, _ = _read_cached(
        cache_path(record, params, cache_dir), _expected_attrs(record, params), False
    )
    return status


def _cache_error(path: Path, exc: BaseException) -> CacheError:
    return CacheError(
        f"Cannot write the density cache in {path.parent} ({one_line(exc)}). Make sure "
        "that folder is writable and the disk is not full, or set CROWD_CACHE to a writable "
        "folder (for example CROWD_CACHE=/tmp/crowd-cache)."
    )


def _write_cached(path: Path, density: np.ndarray, attrs: dict) -> None:
    """Write one cache file atomically; a failed write raises :class:`CacheError`.

    The HDF5 file is built in memory and written with plain file I/O: when HDF5 itself meets a
    full disk it keeps a file handle it cannot close, and Python crashes at exit (h5py issues
    #914, #2160). A failed write leaves the previous file at ``path`` as it was.
    """
    import io

    import h5py

    from helpers.tools.fileio import atomic_path

    try:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as fh:
            chunks = (min(CHUNK_ROWS, density.shape[0]), density.shape[1])
            fh.create_dataset(
                "density",
                data=density.astype(np.float32, copy=False),
                chunks=chunks,
                **COMPRESSION,
            )
            for name, value in attrs.items():
                fh.attrs[name] = value
        with atomic_path(path, suffix=".h5") as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except (OSError, RuntimeError) as exc:  # no permission, disk full (h5py: either type)...
        raise _cache_error(path, exc) from exc


def _build_one(record, params: DensityParams, path: Path, expected: dict) -> tuple[np.ndarray, int]:
    points, shape, n_raw = record_points(record)
    density = density_map(points, shape, params)
    attrs = dict(expected)
    attrs.update(params_to_attrs(params))
    attrs.update(
        {"height": shape[0], "width": shape[1], "n_points": len(points), "n_raw_points": n_raw}
    )
    attrs["map_sum"] = float(density.sum(dtype=np.float64))
    _write_cached(path, density, attrs)
    return density, len(points)


def load_density(
    record,
    params: DensityParams = DEFAULT_PARAMS,
    build: bool = True,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """A record's density map ``H x W`` float32: from the cache if fresh, else built and cached.

    Fresh means: same format version and parameters, and the annotation and image files have
    the size and modification time recorded when the map was built. Stale or damaged files are
    rebuilt. ``build=False`` raises :class:`CacheError` instead of building.
    """
    path = cache_path(record, params, cache_dir)
    expected = _expected_attrs(record, params)
    status, density, _ = _read_cached(path, expected, True)
    if status == "fresh" and density is not None:
        return density
    if not build:
        raise CacheError(
            f"No up-to-date cached density map for {record.image_path} ({status} at {path}). "
            "Build the cache with: crowd density build"
        )
    density, _ = _build_one(record, params, path, expected)
    return density


def _cache_task(record, params: DensityParams, cache_dir) -> tuple[str, int]:
    """Bring one record's cache file up to date: ``(status before, n_points)``."""
    path = cache_path(record, params, cache_dir)
    expected = _expected_attrs(record, params)
    status, _, n_points = _read_cached(path, expected, False)
    if status == "fresh":
        return status, n_points
    _, n_points = _build_one(record, params, path, expected)
    return status, n_points


def build_cache(
    records: Sequence,
    params: DensityParams = DEFAULT_PARAMS,
    progress: bool = True,
    workers: int = 1,
    cache_dir: str | Path | None = None,
) -> dict:
    """Make sure every record has an up-to-date cached map; returns statistics.

    ``{"images", "built" (were missing), "rebuilt_stale", "skipped_fresh", "heads", "seconds",
    "params", "cache_dirs"}``. ``workers > 1`` builds in that many processes (one process is
    usually enough: Part A takes seconds).
    """
    from tqdm.auto import tqdm

    from helpers.tools.fileio import remove_stale_temp_files

    start = time.perf_counter()
    # Temporary files of a build that was killed mid-write: never read, but they pile up.
    for folder in sorted({cache_path(r, params, cache_dir).parent for r in records}):
        remove_stale_temp_files(folder)
    stats = {"images": len(records), "built": 0, "rebuilt_stale": 0, "skipped_fresh": 0, "heads": 0}
    label = {"missing": "built", "stale": "rebuilt_stale", "fresh": "skipped_fresh"}
    bar = tqdm(total=len(records), desc="density maps", unit="img", disable=not progress)
    try:
        if workers is None or int(workers) <= 1 or len(records) <= 1:
            results = (_cache_task(r, params, cache_dir) for r in records)
            for status, n_points in results:
                stats[label[status]] += 1
                stats["heads"] += n_points
                bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")  # safe with threads (torch, Jupyter)
            with ProcessPoolExecutor(max_workers=int(workers), mp_context=ctx) as pool:
                futures = [pool.submit(_cache_task, r, params, cache_dir) for r in records]
                for future in futures:
                    status, n_points = future.result()
                    stats[label[status]] += 1
                    stats["heads"] += n_points
                    bar.update(1)
    finally:
        bar.close()
    roots = sorted({str(cache_dir_for(params, dataset_root_of(r), cache_dir)) for r in records})
    stats.update(
        {
            "seconds": round(time.perf_counter() - start, 3),
            "params": params_key(params),
            "cache_dirs": roots,
        }
    )
    return stats


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``crowd density`` (one action: ``build``)."""
    sub = parser.add_subparsers(dest="action", required=True)
    p_build = sub.add_parser("build", help="build (or bring up to date) the density-map cache")
    p_build.add_argument("--part", choices=["A", "B"], help="dataset part (default: both)")
    p_build.add_argument("--split", choices=["train", "test", "all"], default="all")
    p_build.add_argument("--method", choices=list(METHODS), default="adaptive")
    p_build.add_argument("--sigma", type=float, default=4.0, help="fixed sigma / lone-head sigma (px)")
    p_build.add_argument("--beta", type=float, default=0.3, help="adaptive factor (default 0.3)")
    p_build.add_argument("--k", type=int, default=3, help="adaptive neighbour count (default 3)")
    p_build.add_argument("--truncate", type=float, default=4.0, help="kernel radius in sigmas")
    p_build.add_argument("--min-sigma", type=float, help="clamp every sigma from below (px)")
    p_build.add_argument("--max-sigma", type=float, help="clamp every sigma from above (px)")
    p_build.add_argument("--root", help="dataset root (default: CROWD_DATA, data/ShanghaiTech or synthetic)")
    p_build.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p_build.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the cache for the chosen parts and splits; print the JSON summary; return 0."""
    from helpers.tools.synth import ensure_dataset

    try:
        params = DensityParams(args.method, args.sigma, args.beta, args.k, args.truncate,
                               args.min_sigma, args.max_sigma)
    except ValueError as exc:
        raise CrowdError(f"bad density parameters: {exc}") from exc
    source = ensure_dataset(args.root)
    parts = [args.part] if args.part else list(data.PARTS)
    splits = list(data.OFFICIAL_SPLITS) if args.split == "all" else [args.split]
    records = [r for part in parts for split in splits
               for r in data.list_records(part, split, root=source.root)]
    stats = build_cache(records, params, progress=not args.no_progress, workers=args.workers)
    stats.update({"root": str(source.root), "synthetic": source.synthetic, "parts": parts,
                  "splits": splits})
    print(json.dumps(stats))
    return 0
