"""Package a run of ``benchmarks/accuracy.py`` as the shipped HeatmapCNN of a part.

::

    python benchmarks/package_model.py runs/ship_B --part B
    python benchmarks/package_model.py runs/ship_A --part A [--out DIR] [--command "..."]

1. Reads ``RUN_DIR/best.pt`` (checksum verified when it has one), ``config.json`` and
   ``accuracy.json`` (written by ``benchmarks/accuracy.py``: validation and test errors, time).
2. Writes ``OUT/heatmap_cnn_<PART>.pt`` (default OUT: ``helpers/tools/shipped_models``) holding
   only what inference needs: weights, model name and arguments, density scale, stride, epoch,
   validation scores and the recipe's settings, with a fresh checksum
   (:func:`helpers.tools.checkpoints.save_checkpoint`). Refused above 2 MB.
3. Updates ``OUT/manifest.json``: the file's sha256, the training command (rebuilt from
   ``accuracy.json`` and the recipe, or ``--command``), the dataset checksum (sha256 of its
   ``MANIFEST.sha256``), seed, wall time, epochs, machine, validation / test MAE and RMSE,
   the count range of the training images, dates and the git commit.
4. Regenerates ``OUT/MODEL_CARD.md`` from the manifest (every shipped part).

Needs the dataset the run was trained on (for the count range of its training images).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers.errors import CrowdError
from helpers.tools.verify import sha256

#: The largest shipped checkpoint allowed (bytes): the repository must stay small.
MAX_BYTES = 2 * 1024 * 1024
#: Checkpoint entries copied into the shipped file (besides a reduced config).
KEEP_KEYS = ("format", "model", "model_name", "model_kwargs", "scale", "count_gain", "stride", "epoch", "step",
             "val_mae", "val_rmse", "best_val_mae")
#: Settings that name this machine's folders or session: given by the command's own options.
SESSION_SETTINGS = ("data_root", "out", "resume", "epochs", "max_minutes")
#: Settings that describe a machine or a session, not the recipe: not shipped.
LOCAL_SETTINGS = ("data_root", "out", "resume", "device", "workers")
#: What each part's images show (for the model card).
SCENES = {"A": "dense crowds in photos from the internet (tens to thousands of people)",
          "B": "street scenes photographed in Shanghai (a few to a few hundred people)"}


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CrowdError(f"{path} is missing: {what}")
    return json.loads(path.read_text(encoding="utf-8"))


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The project's commit (with ``+dirty`` when files differ from it), or None outside git."""
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def training_command(accuracy: dict[str, Any], part: str) -> str:
    """The ``benchmarks/accuracy.py`` command that trains this run, from its ``accuracy.json``.

    Options: part, minutes, threads, out, ``--fit-epochs`` (when a speed test planned the epochs)
    or ``--epochs N``, and ``--set KEY=VALUE`` for every setting that differs from the recipe.
    """
    from helpers.tools.recipes import recommended_config

    args = ["python", "benchmarks/accuracy.py", "--part", part, "--minutes", f"{accuracy['minutes']:g}"]
    if "speed_test" in accuracy:
        args.append("--fit-epochs")
    elif accuracy.get("epochs_planned") is not None:
        args += ["--epochs", str(accuracy["epochs_planned"])]
    if accuracy.get("threads") is not None:
        args += ["--threads", str(accuracy["threads"])]
    args += ["--out", str(accuracy["out"])]
    from helpers.tools.trainer import TrainConfig

    raw = accuracy.get("settings") or {}
    # read like a run's config.json: settings of older versions take today's names (loss -> reduction)
    keys = set(raw) | ({"reduction"} if "loss" in raw else set())
    settings = {k: v for k, v in TrainConfig.from_dict(raw).to_dict().items() if k in keys}
    recipe = recommended_config("heatmap_cnn", part, accuracy["out"], quick=False,
                                max_minutes=accuracy["minutes"]).resolved().to_dict()
    for key in sorted(settings):
        if key in SESSION_SETTINGS or key not in recipe:
            continue
        if json.loads(json.dumps(recipe[key])) != settings[key]:  # 0 == 0.0, tuple as list
            args += ["--set", f"{key}={json.dumps(settings[key], separators=(',', ':'))}"]
    return "CROWD_DATA=/path/to/ShanghaiTech " + shlex.join(args)


def training_counts(part: str, root: str, max_fit: int | None) -> dict[str, Any]:
    """Min / median / mean / max people per training (``fit``) image the run saw."""
    from helpers.data import list_records, take_evenly
    from helpers.samples import CrowdDataset

    records = take_evenly(list_records(part, "fit", root), max_fit)
    data = CrowdDataset(records, "eval")
    counts = [data.true_count(i) for i in range(len(records))]
    if not counts:
        raise CrowdError(f"Part {part} of {root} has no training images.")
    return {"images": len(counts), "min": min(counts), "median": statistics.median(counts),
            "mean": round(statistics.fmean(counts), 1), "max": max(counts)}


def dataset_record(root: str) -> dict[str, Any]:
    """Name and checksum (sha256 of ``MANIFEST.sha256``) of the dataset folder ``root``."""
    manifest = Path(root) / "MANIFEST.sha256"
    checksum = sha256(manifest) if manifest.is_file() else None
    if checksum is None:
        print(f"note: {manifest} is missing; the manifest records no dataset checksum.",
              file=sys.stderr)
    return {"name": "ShanghaiTech", "manifest_sha256": checksum}


def shipped_checkpoint_dict(best: dict[str, Any], part: str) -> dict[str, Any]:
    """The entries of ``best.pt`` inference needs, with the recipe settings minus local paths."""
    out = {k: best[k] for k in KEEP_KEYS if k in best}
    missing = [k for k in ("model", "model_name", "scale") if k not in out]
    if missing:
        raise CrowdError(f"best.pt lacks {missing}: it was not written by crowd train.")
    if out["model_name"] != "heatmap_cnn":
        raise CrowdError(f"only HeatmapCNN runs are shipped; this run holds {out['model_name']}.")
    out["config"] = {k: v for k, v in dict(best.get("config") or {}).items() if k not in LOCAL_SETTINGS}
    out["shipped"] = {"part": part, "manifest": "manifest.json"}
    return out


def manifest_entry(run_dir: Path, part: str, target: Path, ckpt: dict[str, Any],
                   command: str | None) -> dict[str, Any]:
    """The manifest record of one packaged run (see the module docstring)."""
    import torch

    from helpers.data import list_records

    config = read_json(run_dir / "config.json", "not a run folder of crowd train")
    accuracy = read_json(run_dir / "accuracy.json",
                         f"evaluate the run first: python benchmarks/accuracy.py --part {part} "
                         f"--eval-only --out {run_dir}")
    root = config.get("data_root")
    if not root:
        raise CrowdError(f"{run_dir}/config.json records no data_root; set it to the dataset used.")
    cfg = ckpt["config"]
    trained = dt.datetime.fromtimestamp((run_dir / "best.pt").stat().st_mtime, dt.timezone.utc)
    return {
        "file": target.name, "sha256": sha256(target), "bytes": target.stat().st_size,
        "model": "heatmap_cnn", "model_kwargs": ckpt.get("model_kwargs", {}), "part": part,
        "checksum": ckpt.get("checksum"),
        "command": command or training_command(accuracy, part),
        "dataset": dataset_record(root), "seed": config.get("seed"),
        "resize": cfg.get("resize"), "scale": ckpt["scale"], "count_gain": ckpt.get("count_gain", 1.0),
        "train_seconds": accuracy.get("train_seconds"), "epochs": accuracy.get("epochs_done"),
        "epochs_planned": accuracy.get("epochs_planned"), "stop_reason": accuracy.get("stop_reason"),
        "checkpoint_epoch": ckpt.get("epoch"),
        "machine": {"cpu": cpu_model(), "torch": torch.__version__, "threads": accuracy.get("threads"),
                    "python": platform.python_version(), "system": platform.system()},
        "val": {"mae": accuracy["val_mae"], "rmse": accuracy["val_rmse"],
                "bias": accuracy.get("val_bias"), "images": len(list_records(part, "val", root))},
        "test": {"mae": accuracy["test_mae"], "rmse": accuracy["test_rmse"],
                 "bias": accuracy.get("test_bias"), "images": accuracy.get("test_images")},
        "mean_predictor_test_mae": accuracy.get("mean_predictor_test_mae"),
        "train_counts": training_counts(part, root, config.get("max_fit")),
        "config": cfg, "git_commit": git_commit(),
        "trained": trained.isoformat(timespec="seconds"),
        "packaged": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def model_card(manifest: dict[str, Any]) -> str:
    """``MODEL_CARD.md``: what the shipped models are, how good, for what, and their limits."""
    models = manifest.get("models", {})
    lines = [
        "# Shipped HeatmapCNN models (model card)", "",
        "Generated by `benchmarks/package_model.py` from `manifest.json` (do not edit by hand).", "",
        "## What they are",
        "Small density-map regressors (HeatmapCNN of this project, notebook 03), one per ShanghaiTech "
        "part, trained from random initialisation with the project's own recipe and command. The "
        "network predicts people per 8 x 8 pixel cell; the sum is the count. Notebooks 05 and 06 use "
        "them, labelled as shipped, when you have no trained run of your own for a part.", "",
        "| part | file | size | epochs | train time | val MAE | val RMSE | test MAE | test RMSE |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for part, e in sorted(models.items()):
        lines.append(
            f"| {part} | `{e['file']}` | {e['bytes'] / 1e6:.2f} MB | {e['epochs']} | "
            f"{(e['train_seconds'] or 0) / 60:.0f} min | {e['val']['mae']:.2f} | {e['val']['rmse']:.2f} | "
            f"{e['test']['mae']:.2f} | {e['test']['rmse']:.2f} |")
    lines += ["", "Errors are people per image. The checkpoint was chosen on the validation images "
              "only; the test images were used once, to report these numbers.", ""]
    for part, e in sorted(models.items()):
        c, m = e["train_counts"], e["machine"]
        lines += [
            f"## Part {part}",
            f"- Training data: ShanghaiTech part {part}, {SCENES.get(part, '')}; the `fit` split: "
            f"{c['images']} images with {c['min']} to {c['max']} people (median {c['median']:g}, "
            f"mean {c['mean']:g}); validation: {e['val']['images']} images, test: {e['test']['images']} images.",
            f"- Resolution: images are resized by {e['resize']:g} before counting (as in training).",
            f"- Command: `{e['command']}` (seed {e['seed']}, project commit `{e['git_commit']}`).",
            f"- Dataset checksum (sha256 of `MANIFEST.sha256`): `{e['dataset']['manifest_sha256']}`.",
            f"- Machine: {m['cpu']}, torch {m['torch']}, {m['threads']} thread(s); trained {e['trained']}.",
            f"- Reference: predicting the training mean for every test image gives test MAE "
            f"{e['mean_predictor_test_mae']:.2f}." if e.get("mean_predictor_test_mae") is not None else
            "- Reference: no mean-predictor score recorded.",
            f"- File sha256: `{e['sha256']}`.", "",
        ]
    lines += [
        "## Intended use", "Teaching: seeing what a trained density-map counter does, on the dataset's "
        "images or your own photos, without a GPU. Not for counting people where the number matters "
        "(safety, security, events): no guarantee of accuracy, and no study of its failures.", "",
        "## Limits",
        "- It has only seen crowds within the count range of its part above: much denser or sparser "
        "scenes are counted badly. The Part A model knows dense, mostly distant crowds; the Part B "
        "model street scenes from a fixed height. Use the model of the part that looks like your photo.",
        "- Heads much larger or smaller than in its training images (close-ups, a very different "
        "camera height or resolution), indoor scenes, night, and drawings are outside what it saw.",
        "- It is small and was trained on a CPU in under an hour: CSRNet (notebook 04) is more accurate.", "",
        "## Licence of the data",
        "ShanghaiTech (Zhang et al., CVPR 2016) is released for research use only. The models were "
        "trained on it for this teaching project; the images are not redistributed here. Get the "
        "dataset from its authors and respect its terms.", "",
    ]
    return "\n".join(lines)


def package(run_dir: Path, part: str, out: Path, command: str | None = None) -> dict[str, Any]:
    """Write the shipped checkpoint, manifest and model card; returns the manifest entry."""
    from helpers.tools.checkpoints import load_checkpoint, save_checkpoint
    from helpers.tools.fileio import write_json_atomic, write_text_atomic
    from helpers.tools.shipped import read_manifest, shipped_filename

    part = part.upper()
    shipped = shipped_checkpoint_dict(load_checkpoint(run_dir / "best.pt"), part)
    out.mkdir(parents=True, exist_ok=True)
    target = save_checkpoint(out / shipped_filename(part), shipped)
    if target.stat().st_size > MAX_BYTES:
        target.unlink()
        raise CrowdError(f"the packaged model is over {MAX_BYTES / 1e6:.0f} MB; ship a smaller one.")
    shipped = load_checkpoint(target)  # as written, checksum included (and verified)
    entry = manifest_entry(run_dir, part, target, shipped, command)
    manifest = read_manifest(out)
    manifest["format"] = 1
    manifest["models"][part] = entry
    write_json_atomic(out / "manifest.json", manifest)
    write_text_atomic(out / "MODEL_CARD.md", model_card(manifest))
    return entry


def main(argv: list[str] | None = None) -> int:
    from helpers.tools.shipped import SHIPPED_DIR

    p = argparse.ArgumentParser(prog="python benchmarks/package_model.py", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="run folder of benchmarks/accuracy.py (best.pt, accuracy.json)")
    p.add_argument("--part", required=True, type=str.upper, choices=["A", "B"])
    p.add_argument("--out", type=Path, default=SHIPPED_DIR, help=f"shipped folder (default {SHIPPED_DIR})")
    p.add_argument("--command", default=None, help="the exact training command (default: rebuilt "
                   "from accuracy.json and the recipe)")
    args = p.parse_args(argv)
    try:
        entry = package(args.run_dir, args.part, args.out, args.command)
    except CrowdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"file": str(args.out / entry["file"]), "sha256": entry["sha256"],
                      "bytes": entry["bytes"], "val_mae": entry["val"]["mae"],
                      "test_mae": entry["test"]["mae"], "command": entry["command"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
