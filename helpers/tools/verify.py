"""Checking a ShanghaiTech download, and which dataset the series uses.

``crowd verify [ROOT] [--checksums FILE] [--json]`` counts the images of every split, pairs each
image with its annotation (orphans either way are problems) and compares every file's sha256 with
``data/ShanghaiTech.sha256``; exit status 1 when anything is wrong. A JPEG whose compressed pixels
are damaged decodes with garbled blocks (no decoder can tell): only this check finds it.
``crowd where`` prints which dataset the series will use, and why (as JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from helpers import config, data
from helpers.errors import CrowdError, DatasetNotFoundError

EXPECTED_IMAGES = {("A", "train"): 300, ("A", "test"): 182, ("B", "train"): 400, ("B", "test"): 316}


@dataclass
class VerifyReport:
    """Result of :func:`verify`: per-split counts and every problem found."""

    root: Path
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    checked_checksums: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def default_checksum_file() -> Path:
    """``data/ShanghaiTech.sha256`` of this checkout (shipped with the code), else of the project.

    The project folder (CROWD_HOME) may be elsewhere, e.g. on Google Drive; the list comes with the
    code, so it is looked for beside the code first.
    """
    name = Path("data") / "ShanghaiTech.sha256"
    beside_code = Path(__file__).resolve().parents[2] / name
    return beside_code if beside_code.is_file() else config.project_root() / name


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_checksums(checksums: str | Path | None, report: VerifyReport) -> dict[str, str]:
    path = Path(checksums) if checksums else default_checksum_file()
    if path.is_file():
        pairs = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
        return {rel.strip(): digest for digest, rel in pairs}
    if checksums:
        raise CrowdError(f"Checksum list {path} does not exist. Check the path.")
    report.problems.append(f"checksum list {path} not found: sha256 not checked")
    return {}


def _check_split(root: Path, part: str, split: str, report: VerifyReport) -> list[tuple[str, Path]]:
    """Count and pair one split's files; returns ``(relative path, file)`` pairs to hash."""
    key = f"part_{part}/{split}"
    try:
        sdir = data.split_dir(root, part, split)
    except DatasetNotFoundError as exc:
        report.problems.append(str(exc))
        return []
    images = data.list_images(sdir / "images")
    report.counts[key] = len(images)
    want = EXPECTED_IMAGES[(part, split)]
    if len(images) != want:
        report.problems.append(f"{key}: {len(images)} images, expected {want}")
    to_hash = []
    for img in images:
        gt = data.find_points_file(img)
        if gt is None:
            report.problems.append(f"{img}: no annotation (expected ground-truth/GT_{img.stem}.mat)")
        else:
            to_hash.append((f"part_{part}/{split}_data/ground-truth/{gt.name}", gt))
        to_hash.append((f"part_{part}/{split}_data/images/{img.name}", img))
    stems = {img.stem for img in images}
    for gt_dir in ("ground-truth", "ground_truth"):
        for gt in sorted((sdir / gt_dir).glob("GT_*.mat")) if (sdir / gt_dir).is_dir() else []:
            if gt.stem.removeprefix("GT_") not in stems:
                report.problems.append(f"{gt}: annotation without an image")
    return to_hash


def verify(root: str | Path, checksums: str | Path | None = None, progress: bool = True) -> VerifyReport:
    """Check a ShanghaiTech download: file counts, image/annotation pairs, and sha256 sums."""
    from tqdm.auto import tqdm

    report = VerifyReport(root=data.check_layout(Path(root)))
    expected = _read_checksums(checksums, report)
    to_hash = [pair for part in data.PARTS for split in data.OFFICIAL_SPLITS
               for pair in _check_split(report.root, part, split, report)]
    if not expected:
        return report
    seen = set()
    for rel, path in tqdm(to_hash, desc="sha256", unit="file", disable=not progress):
        seen.add(rel)
        want = expected.get(rel)
        if want is None:
            report.problems.append(f"{path}: not in the checksum list")
        elif sha256(path) != want:
            report.problems.append(f"{path}: sha256 mismatch (corrupt or modified file)")
        report.checked_checksums += 1
    missing = sorted(set(expected) - seen)
    report.problems += [f"{rel}: missing" for rel in missing[:20]]
    if len(missing) > 20:
        report.problems.append(f"... and {len(missing) - 20} more missing files")
    return report


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``crowd verify``."""
    parser.add_argument("root", nargs="?", help="dataset root (default: CROWD_DATA or data/ShanghaiTech)")
    parser.add_argument("--checksums", help="sha256 list (default: data/ShanghaiTech.sha256)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_verify(args: argparse.Namespace) -> int:
    """Print the report (plain lines or JSON); 0 when the dataset is complete and intact, else 1."""
    root = args.root or config.env_data_root() or config.default_data_root()
    report = verify(root, args.checksums, progress=not args.json)
    if args.json:
        print(json.dumps({"root": str(report.root), "ok": report.ok, "counts": report.counts,
                          "checksums_checked": report.checked_checksums, "problems": report.problems}))
    else:
        for key, n in report.counts.items():
            print(f"{key}: {n} images")
        print(f"sha256 checked: {report.checked_checksums} files")
        for problem in report.problems:
            print(f"PROBLEM: {problem}")
        print("dataset complete and intact" if report.ok else f"{len(report.problems)} problem(s) found")
    return 0 if report.ok else 1


def add_where_arguments(parser: argparse.ArgumentParser) -> None:
    """``crowd where`` takes no options."""


def run_where(args: argparse.Namespace) -> int:
    """Print ``{"root", "synthetic", "origin"}`` of the dataset in use (generating the synthetic
    set first when it is the one, as the notebooks would)."""
    from helpers.tools.synth import ensure_dataset

    source = ensure_dataset()
    print(json.dumps({"root": str(source.root), "synthetic": source.synthetic, "origin": source.origin}))
    return 0
