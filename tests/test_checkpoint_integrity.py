"""Checkpoints that cannot silently go wrong (issue 13, section 7).

A real run is trained on a tiny ShanghaiTech-layout set; then 48 bytes inside the tensor data of
its best.pt (located through the zip directory, not in any header) are flipped, as a bad disk or
an interrupted Drive sync leaves them. Every way in must refuse it by name: ``crowd predict``,
``crowd evaluate``, resuming (``crowd train --resume``, with last.pt damaged) and runs discovery
(which lists the run as damaged instead of crashing). Intact files still load; files written
before checksums existed load with one note.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from helpers.errors import CheckpointError
from helpers.models import build_model
from helpers.tools import checkpoints, runs
from helpers.tools.checkpoints import (
    CheckpointDamagedError,
    content_checksum,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from helpers.tools.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_shtech) -> Path:
    """A real (tiny) training run: runs/tiny_B/{best.pt,last.pt,config.json,history.csv}."""
    home = tmp_path_factory.mktemp("integrity_home")
    out = home / "runs" / "tiny_B"
    cfg = TrainConfig(model="heatmap_cnn", model_kwargs={"width": 8}, part="B", epochs=1, crop=64,
                      batch_size=4, device="cpu", workers=0, cache_in_memory=False,
                      data_root=str(tiny_shtech), out=str(out), bn_recalibrate=0, amp=False)
    result = train(cfg)
    assert result.best.is_file() and result.last.is_file()
    return out


@pytest.fixture()
def run_copy(trained_run, tmp_path) -> Path:
    """A fresh copy of the trained run folder (home/runs/tiny_B) that a test may damage."""
    out = tmp_path / "home" / "runs" / "tiny_B"
    shutil.copytree(trained_run, out)
    return out


def tensor_data_span(path: Path) -> tuple[int, int]:
    """``(offset, size)`` in the file of the largest tensor storage of a torch.save zip."""
    with zipfile.ZipFile(path) as archive:
        storages = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 0]
        info = max(storages, key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED  # torch stores tensors uncompressed
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    assert header[:4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_tensor_bytes(path: Path, n: int = 48) -> None:
    """Invert ``n`` bytes in the middle of the largest tensor's data (headers untouched)."""
    start, size = tensor_data_span(path)
    assert size >= n
    offset = start + (size - n) // 2
    data = bytearray(path.read_bytes())
    before = hashlib.sha256(data).hexdigest()
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))
    assert hashlib.sha256(path.read_bytes()).hexdigest() != before
    with zipfile.ZipFile(path) as archive:  # still a well-formed zip: only tensor bytes changed
        assert archive.namelist()


def _crowd(args: list[str], home: Path, data: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CROWD_HOME=str(home), CROWD_DATA=str(data), OMP_NUM_THREADS="1",
               CROWD_CACHE=str(home / "build" / "cache"))
    env.pop("CROWD_QUICK", None)
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _assert_refused(proc: subprocess.CompletedProcess, path: Path) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert str(path) in errors[0] and "damaged" in errors[0] and "train again" in errors[0]


# --------------------------------------------------------------------------- the checksum


def test_checksum_is_of_the_contents_and_survives_a_round_trip(tmp_path):
    model = build_model("heatmap_cnn", width=8)
    ckpt = {"model": model.state_dict(), "model_name": "heatmap_cnn", "scale": 100.0, "epoch": 3,
            "config": {"resize": 0.5, "rescale": [0.8, 1.2]}, "rng": {"torch": torch.get_rng_state()},
            "optimizer": {"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": [{"lr": 1e-3}]}}
    path = save_checkpoint(tmp_path / "a.pt", ckpt)
    assert "checksum" not in ckpt  # the caller's dict is not changed
    loaded = load_checkpoint(path)
    assert loaded["checksum"] == content_checksum(ckpt) == content_checksum(loaded)
    assert loaded["checksum"].startswith("sha256:") and len(loaded["checksum"]) == 7 + 64
    # key order does not matter; a view and a copy of the same values hash alike
    assert content_checksum(dict(reversed(list(ckpt.items())))) == content_checksum(ckpt)
    w = torch.arange(12.0).reshape(3, 4)
    assert content_checksum({"w": w.t()}) == content_checksum({"w": w.t().contiguous()})
    # any change of value, dtype, shape or metadata changes it
    changed = dict(ckpt, model={**ckpt["model"]})
    key = next(iter(changed["model"]))
    tensor = changed["model"][key].clone()
    tensor.view(-1)[0] += 1e-6
    changed["model"][key] = tensor
    assert content_checksum(changed) != content_checksum(ckpt)
    assert content_checksum({"w": w}) != content_checksum({"w": w.double()})
    assert content_checksum({"w": w}) != content_checksum({"w": w.reshape(4, 3)})
    assert content_checksum(dict(ckpt, epoch=4)) != content_checksum(ckpt)
    assert content_checksum(dict(ckpt, scale=100)) != content_checksum(ckpt)  # int, not float


def test_hashing_a_csrnet_size_state_dict_is_cheap():
    state = build_model("csrnet", pretrained=None).state_dict()
    megabytes = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    assert 60 < megabytes < 70
    content_checksum({"model": state})  # warm up
    t0 = time.perf_counter()
    content_checksum({"model": state})
    seconds = time.perf_counter() - t0
    print(f"checksum of a CSRNet state dict ({megabytes:.0f} MB): {seconds * 1000:.0f} ms")
    assert seconds < 2.0  # about 40 ms with SHA instructions; a slow shared CPU stays far below


def test_intact_run_loads_and_old_checkpoints_load_with_one_note(run_copy, tmp_path, capsys):
    best = run_copy / "best.pt"
    ckpt = load_checkpoint(best)
    assert ckpt["checksum"] == content_checksum(ckpt)
    model, info = load_model(best, device="cpu", expect_model="heatmap_cnn")
    assert info.model_name == "heatmap_cnn"
    assert capsys.readouterr().err == ""
    old = tmp_path / "old" / "best.pt"
    old.parent.mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != "checksum"}, old)  # as before checksums
    for _ in range(2):
        load_model(old, device="cpu")
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: {old} has no checksum")
    assert checkpoints.verify_checksum(old, torch.load(old, weights_only=True)) is False


def test_a_tampered_value_with_a_stale_checksum_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", {"model": {"w": torch.ones(4)}, "epoch": 1})
    ckpt = torch.load(path, weights_only=True)
    ckpt["epoch"] = 2  # changed without a new checksum (not through save_checkpoint)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointDamagedError, match=r"best\.pt is damaged.*last\.pt"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- the scenario


def test_flipped_best_pt_is_refused_in_process(run_copy):
    best = run_copy / "best.pt"
    flip_tensor_bytes(best)
    with pytest.raises(CheckpointDamagedError) as caught:
        load_model(best, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and str(best) in message
    assert str(run_copy / "last.pt") in message and "train again" in message
    assert isinstance(caught.value, CheckpointError)
    load_model(run_copy / "last.pt", device="cpu")  # the advice holds: the other file is fine


def test_flipped_best_pt_refused_by_predict_and_evaluate(run_copy, tiny_shtech):
    home = run_copy.parent.parent
    best = run_copy / "best.pt"
    image = next((tiny_shtech / "part_B" / "train_data" / "images").glob("*.jpg"))
    ok = _crowd(["predict", str(image), "--checkpoint", str(best), "--out", str(home / "pred")],
                home, tiny_shtech)
    assert ok.returncode == 0, ok.stderr  # intact: counts
    flip_tensor_bytes(best)
    proc = _crowd(["predict", str(image), "--checkpoint", str(best), "--out", str(home / "pred")],
                  home, tiny_shtech)
    _assert_refused(proc, best)
    assert proc.stdout.strip() == ""  # no count printed
    proc = _crowd(["evaluate", "--checkpoint", str(best), "--part", "B", "--split", "val",
                   "--data-root", str(tiny_shtech), "--csv", str(home / "eval.csv")], home, tiny_shtech)
    _assert_refused(proc, best)
    assert not (home / "eval.csv").exists()


def test_flipped_last_pt_refused_by_resume(run_copy, tiny_shtech):
    home, last = run_copy.parent.parent, run_copy / "last.pt"
    flip_tensor_bytes(last)
    proc = _crowd(["train", "--resume", "--out", str(run_copy), "--epochs", "2", "--device", "cpu",
                   "--workers", "0"], home, tiny_shtech)
    _assert_refused(proc, last)
    assert str(run_copy / "best.pt") in proc.stderr  # the other checkpoint is named


def test_runs_discovery_marks_a_damaged_run(run_copy, tiny_shtech, monkeypatch):
    home = run_copy.parent.parent
    monkeypatch.setenv("CROWD_HOME", str(home))
    found = runs.find_runs(home / "runs")
    assert [r.name for r in found] == ["tiny_B"] and found[0].ok and not found[0].damaged
    flip_tensor_bytes(run_copy / "best.pt")
    found = runs.find_runs(home / "runs")  # a new file version: read and verified again
    assert len(found) == 1 and found[0].damaged and not found[0].ok
    assert "damaged" in found[0].error and "damaged checkpoint" in found[0].label
    assert runs.best_run(found) is None
    assert "| `tiny_B` | damaged |" in runs.runs_markdown(found)
    proc = _crowd(["runs", "--root", str(home / "runs")], home, tiny_shtech)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "tiny_B: damaged checkpoint" in proc.stdout
