"""The HeatmapCNN models shipped with the project (issue 13, section 3).

For each model in ``helpers/tools/shipped_models/manifest.json``: the file loads with
``weights_only=True``, its sha256 is the manifest's, its content checksum verifies, it is under
2 MB, and with the real data (``CROWD_DATA``; skipped with a reason otherwise) it reproduces the
recorded validation MAE (``helpers.tools.evaluate``, every validation image, as
``benchmarks/accuracy.py`` scored it). With no model packaged yet these tests have no cases.

The packaging itself is tested end to end on a tiny real run: ``benchmarks/accuracy.py`` trains
and scores it in a temporary project, ``benchmarks/package_model.py`` packages it, and the result
is checked like a shipped model, against independent computations (file hash, count range from
the annotation files, the recorded command run again), and through runs discovery.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.data import DataSource, list_records, read_points
from helpers.tools import cli, evaluate, runs, shipped
from helpers.tools.checkpoints import content_checksum, load_checkpoint, load_model

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = shipped.read_manifest()["models"]
TOLERANCE = 0.05  # people per image

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_shipped_file(path: Path, entry: dict) -> None:
    """The checks every shipped file passes: hash, safe load, checksum, size, a usable model."""
    assert path.name == entry["file"] and path.stat().st_size == entry["bytes"] < 2 * 1024 * 1024
    assert _sha256(path) == entry["sha256"], f"{path} differs from the file its manifest records"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(raw, dict) and raw["checksum"] == entry["checksum"] == content_checksum(raw)
    assert load_checkpoint(path)["checksum"] == entry["checksum"]  # verified on load
    model, info = load_model(path, device="cpu", expect_model="heatmap_cnn")
    assert info.input_scale == entry["resize"]
    assert info.scale == pytest.approx(entry["scale"] / entry.get("count_gain", 1.0), rel=1e-12)
    assert set(raw) >= {"model", "model_name", "model_kwargs", "scale", "config", "best_val_mae"}
    assert not {"optimizer", "rng", "data_root"} & set(raw)  # inference needs only the weights


def validation_mae(path: Path, part: str, root: Path) -> float:
    """MAE of the checkpoint on every validation image of ``part`` (whole images, its resize)."""
    n = len(list_records(part, "val", root))
    result = evaluate.evaluate_checkpoint(path, part, "val", root=root, limit=n, device="cpu",
                                          progress=False)
    assert result.summary["images"] == n
    return float(result.summary["mae"])


# --------------------------------------------------------------------------- the shipped files


@pytest.mark.parametrize("part", sorted(SHIPPED))
def test_shipped_file_matches_its_manifest(part, capsys):
    entry = SHIPPED[part]
    path = shipped.shipped_checkpoint(part)
    check_shipped_file(path, entry)
    card = (shipped.SHIPPED_DIR / shipped.MODEL_CARD_NAME).read_text(encoding="utf-8")
    assert f"## Part {part}" in card and entry["sha256"] in card and "research use only" in card
    run = shipped.shipped_run(part)
    assert run.ok and run.shipped and run.title == f"shipped HeatmapCNN (Part {part}, trained by the project)"
    assert cli.main(["runs", "shipped", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"name": f"shipped/heatmap_cnn_{part}", "part": part, "shipped": True,
            "damaged": False, "error": None}.items() <= next(r for r in listed if r["part"] == part).items()


@pytest.mark.dataset
@pytest.mark.slow
@pytest.mark.parametrize("part", sorted(SHIPPED))
def test_shipped_model_reproduces_its_validation_mae(part, real_data_root):
    entry = SHIPPED[part]
    manifest = real_data_root / "MANIFEST.sha256"
    if entry["dataset"]["manifest_sha256"] and manifest.is_file():
        assert _sha256(manifest) == entry["dataset"]["manifest_sha256"], "another dataset version"
    mae = validation_mae(shipped.shipped_checkpoint(part), part, real_data_root)
    assert abs(mae - entry["val"]["mae"]) <= TOLERANCE, (mae, entry["val"]["mae"])


# --------------------------------------------------------------------------- packaging, end to end


def _run(args: list[str], home: Path, data: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CROWD_HOME=str(home), CROWD_DATA=str(data), OMP_NUM_THREADS="1",
               CROWD_CACHE=str(home / "build" / "cache"))
    env.pop("CROWD_QUICK", None)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


TINY_SETTINGS = ["--set", "crop=32", "--set", "workers=0", "--set", "cache_in_memory=false",
                 "--set", 'model_kwargs={"width":8}', "--set", "batch_size=4",
                 "--set", "bn_recalibrate=0", "--set", "max_fit=8"]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A tiny ShanghaiTech-layout set (with a test split and MANIFEST.sha256), a run of
    benchmarks/accuracy.py on it in a temporary project, and that run packaged."""
    from conftest import write_tiny_shtech

    base = tmp_path_factory.mktemp("shipping")
    data = write_tiny_shtech(base / "data", n_images=12, seed=3)
    shutil.copytree(data / "part_B" / "train_data", data / "part_B" / "test_data")
    (data / "MANIFEST.sha256").write_text("0" * 64 + "  part_B/train_data/images/IMG_1.jpg\n")
    home, out = base / "home", base / "shipped_models"
    run_dir = home / "runs" / "ship_B"
    _run(["benchmarks/accuracy.py", "--part", "B", "--minutes", "3", "--epochs", "2", "--threads",
          "1", "--out", str(run_dir), *TINY_SETTINGS], home, data)
    proc = _run(["benchmarks/package_model.py", str(run_dir), "--part", "B", "--out", str(out)],
                home, data)
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"data": data, "home": home, "out": out, "run_dir": run_dir, "printed": printed}


def test_packaging_writes_a_checked_model_manifest_and_card(packaged):
    out, data, run_dir = packaged["out"], packaged["data"], packaged["run_dir"]
    entry = shipped.read_manifest(out)["models"]["B"]
    path = shipped.shipped_checkpoint("B", out)
    assert path == out / "heatmap_cnn_B.pt" and packaged["printed"]["sha256"] == entry["sha256"]
    check_shipped_file(path, entry)
    accuracy = json.loads((run_dir / "accuracy.json").read_text())
    assert entry["val"]["mae"] == accuracy["val_mae"] and entry["test"]["rmse"] == accuracy["test_rmse"]
    assert entry["epochs"] == 2 and entry["seed"] == 0 and entry["train_seconds"] > 0
    assert entry["dataset"]["manifest_sha256"] == _sha256(data / "MANIFEST.sha256")
    assert entry["machine"]["torch"] == torch.__version__ and entry["machine"]["threads"] == 1
    assert entry["machine"]["cpu"] and entry["trained"] and entry["packaged"]
    # the count range of the 8 training images, from the annotation files themselves
    fit = list_records("B", "fit", data)
    picked = [fit[i] for i in sorted({round(i * (len(fit) - 1) / 7) for i in range(8)})]
    counts = [len(read_points(r.points_path)) for r in picked]
    c = entry["train_counts"]
    assert (c["images"], c["min"], c["max"]) == (8, min(counts), max(counts))
    assert c["median"] == statistics.median(counts)
    # the same weights as the run's best.pt, nothing of the optimizer
    best = load_checkpoint(run_dir / "best.pt")
    for key, value in best["model"].items():
        assert torch.equal(value, load_checkpoint(path)["model"][key])
    card = (out / "MODEL_CARD.md").read_text(encoding="utf-8")
    for text in ("research use only", "not redistributed", f"{entry['val']['mae']:.2f}",
                 f"{entry['test']['mae']:.2f}", f"{c['min']} to {c['max']} people",
                 "resized by 0.5", entry["command"], "Intended use", "Teaching"):
        assert text in card, text
    # with the data: the recorded validation MAE is reproduced by helpers.tools.evaluate
    assert abs(validation_mae(path, "B", data) - entry["val"]["mae"]) <= TOLERANCE


def test_recorded_command_retrains_the_same_model(packaged):
    entry = shipped.read_manifest(packaged["out"])["models"]["B"]
    words = shlex.split(entry["command"])
    assert words[0] == "CROWD_DATA=/path/to/ShanghaiTech" and words[1:3] == ["python", "benchmarks/accuracy.py"]
    assert "--set" in words and "max_fit=8" in words  # the settings that differ from the recipe
    args = words[2:]
    again = packaged["home"] / "runs" / "again_B"
    args[args.index("--out") + 1] = str(again)
    _run(args, packaged["home"], packaged["data"])
    redone = json.loads((again / "accuracy.json").read_text())
    assert abs(redone["val_mae"] - entry["val"]["mae"]) < 1e-3
    assert abs(redone["test_mae"] - entry["test"]["mae"]) < 1e-3


def test_runs_discovery_shows_the_shipped_model_labelled(packaged, tmp_path):
    out, data, home = packaged["out"], packaged["data"], packaged["home"]
    source = DataSource(data, synthetic=False, origin="argument")
    shipped_run = shipped.shipped_run("B", out)
    assert shipped_run.shipped and shipped_run.ok and shipped_run.part == "B"
    assert shipped_run.title == "shipped HeatmapCNN (Part B, trained by the project)"
    assert "shipped HeatmapCNN" in shipped_run.label and shipped_run.data == runs.SHANGHAITECH
    text = runs.describe_run(shipped_run)
    entry = shipped.read_manifest(out)["models"]["B"]
    assert "not a model of your own" in text and f"Validation MAE: {entry['val']['mae']:.1f}" in text
    assert shipped.shipped_run("A", out) is None
    # no run of the student's own: only the shipped model, nothing is trained
    empty = tmp_path / "runs"
    shown = runs.models_to_show("B", source, root=empty, shipped_dir=out)
    assert [r.shipped for r in shown] == [True] and not empty.exists()
    # only a demo run (8 training images): the shipped model beside it, the student's first
    shown = runs.models_to_show("B", source, root=home / "runs", shipped_dir=out,
                                train_if_missing=False)
    assert [r.shipped for r in shown] == [False, True] and shown[0].demo
    assert shown[0].title == "HeatmapCNN" and shown[0].path.parent.parent == home / "runs"
    # a full run of the student's own: the shipped model is not shown
    full = tmp_path / "full_runs" / "mine_B"
    shutil.copytree(packaged["run_dir"], full)
    cfg = json.loads((full / "config.json").read_text())
    cfg["max_fit"] = None
    (full / "config.json").write_text(json.dumps(cfg))
    shown = runs.models_to_show("B", source, root=full.parent, shipped_dir=out)
    assert [(r.name, r.shipped) for r in shown] == [("mine_B", False)]
    # a damaged shipped file is reported, not used silently
    broken = tmp_path / "broken_shipped"
    shutil.copytree(out, broken)
    data_bytes = bytearray((broken / "heatmap_cnn_B.pt").read_bytes())
    from test_checkpoint_integrity import tensor_data_span

    start, size = tensor_data_span(broken / "heatmap_cnn_B.pt")
    data_bytes[start + size // 2] ^= 0xFF
    (broken / "heatmap_cnn_B.pt").write_bytes(bytes(data_bytes))
    bad = shipped.shipped_run("B", broken)
    assert bad.damaged and not bad.ok and "restore the file" in bad.error
