"""Faults never lose work: SIGKILL at random points of training and of a density-cache build.

Training: a real ``crowd train``-equivalent process (``helpers.tools.cli.main`` run by a
small driver script, written into a temporary folder) kills itself with SIGKILL at a point chosen
by the test: at a seeded random moment between two optimiser steps, or in the middle of writing
``last.pt``, ``best.pt`` or ``history.csv`` (the temporary file half written, or complete but not
yet renamed). The run is then resumed with ``--resume`` (sometimes killed again) and must end with
bitwise the same weights, optimiser state, weight average, ``best.pt`` and history as an
uninterrupted run, computed once for the module. After a kill, ``last.pt`` must be the last
checkpoint whose write completed; temporary files the kill left behind are deleted by the next run.

Cache: ``crowd density build`` is killed at a random moment and between writing a
map and renaming it; partial files (torn, written by a writer killed inside HDF5, wrong or missing
attributes or data) are put at the final names by hand. The next
:func:`helpers.tools.density_cache.build_cache` finds the partial, damaged and missing files, rebuilds exactly
those, removes the temporary leftovers, and every map equals a fresh computation.

Everything runs on the tiny 12-image set of ``tests/conftest.py`` (HeatmapCNN width 8, 64 px
crops, 3 epochs of 6 steps): 16 short training processes and 3 cache builds, about a minute
on two cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import data, density
from helpers.errors import CheckpointError
from helpers.tools import cache as density_cache
from helpers.tools.checkpoints import load_checkpoint
from helpers.tools.fileio import stale_temp_files
from helpers.tools.trainer import read_history

TRAIN_ARGS = [
    "--model-arg", "width=8", "--batch-size", "2", "--crop", "64", "--device", "cpu",
    "--epochs", "3", "--checkpoint-every", "4", "--rescale", "0.8", "1.2", "--gray-prob", "0.3",
    "--scheduler", "cosine", "--ema-decay", "0.9", "--workers", "0",
]  # fmt: skip
STEPS_PER_EPOCH, TOTAL_STEPS = 6, 18  # 11 fit images in batches of 2, 3 epochs
#: Steps at which last.pt is written: every 4 steps, and at every epoch end (4, 6, 8, 12, 16, 18).
CHECKPOINT_STEPS = tuple(sorted({*range(4, TOTAL_STEPS + 1, 4),
                                 *range(STEPS_PER_EPOCH, TOTAL_STEPS + 1, STEPS_PER_EPOCH)}))
SIGKILLED = -signal.SIGKILL
TIMEOUT = 120

# The driver: applies one "kill plan" (JSON, first argument) to this process, then runs the
# training or density command line with the remaining arguments. The patches only observe: the
# numbers computed are those of the unpatched code.
DRIVER = r'''
import io, json, os, signal, sys, threading, time
from pathlib import Path

plan = json.loads(sys.argv[1])
command, argv = sys.argv[2], sys.argv[3:]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


kind = plan.get("kind")
if kind == "step":
    # A random moment of step `after` + 1 of this process: a timer started after the forward
    # pass of step `after` fires `delay` seconds later (backward, optimiser step, checkpoint
    # writes, validation, data loading...); if it has not fired when the next step computes its
    # loss, die there.
    import helpers.train as T  # the core: train_step computes the loss with T.density_loss

    real_loss, steps = T.density_loss, [0]

    def counted(*args, **kwargs):
        steps[0] += 1
        if steps[0] == plan["after"] + 1:
            die()
        loss = real_loss(*args, **kwargs)
        if steps[0] == plan["after"]:
            timer = threading.Timer(plan["delay"], die)
            timer.daemon = True
            timer.start()
        return loss

    T.density_loss = counted
elif kind == "write":
    # The `nth` atomic write of a file whose name matches `name` (fnmatch) in this process dies
    # half-way through torch.save ("torn") or after the complete temporary file, before the
    # rename ("unrenamed").
    from fnmatch import fnmatch

    name, nth, seen = plan["name"], plan["nth"], [0]
    if plan["mode"] == "torn":
        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and fnmatch(Path(f).name, f".{name}.*"):
                seen[0] += 1
                if seen[0] == nth:
                    buffer = io.BytesIO()
                    real_save(obj, buffer, *args, **kwargs)
                    raw = buffer.getvalue()
                    with open(f, "wb") as fh:
                        fh.write(raw[: len(raw) // 2])
                        fh.flush()
                        os.fsync(fh.fileno())
                    die()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if fnmatch(Path(dst).name, name):
                seen[0] += 1
                if seen[0] == nth:
                    die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
elif kind == "slow_maps":
    # Every density map takes `sleep` more seconds: time for the test to kill the build.
    import helpers.tools.cache as D  # the cache builds maps with its density_map

    real_map = D.density_map

    def slow(*args, **kwargs):
        time.sleep(plan["sleep"])
        return real_map(*args, **kwargs)

    D.density_map = slow
if command == "train":
    from helpers.tools.cli import main

    sys.exit(main(["train", *argv]))
from helpers.tools.cli import main

sys.exit(main(["density", *argv]))
'''


# --------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def fault_env(tiny_shtech, tmp_path_factory) -> dict[str, str]:
    """Environment of every subprocess: the tiny set, a module-wide cache, one thread."""
    base = tmp_path_factory.mktemp("faults")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROWD_")}
    env.update({
        "CROWD_DATA": str(tiny_shtech), "CROWD_HOME": str(base / "home"),
        "CROWD_CACHE": str(base / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    _driver_path(env).write_text(DRIVER)
    return env


def _driver_path(env: dict[str, str]) -> Path:
    return Path(env["CROWD_HOME"]).parent / "kill_driver.py"


def _drive(env: dict[str, str], plan: dict | None, command: str, args: list[str],
           popen: bool = False):
    """Run the driver: ``command`` is ``train`` or ``density``, ``plan`` says where to die."""
    cmd = [sys.executable, str(_driver_path(env)), json.dumps(plan or {}), command, *args]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _train(env, out: Path, plan: dict | None = None, resume: bool = False):
    args = [*TRAIN_ARGS, "--out", str(out), *(["--resume"] if resume else [])]
    return _drive(env, plan, "train", args)


def _explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-3000:]}"


def _killed(proc) -> None:
    assert proc.returncode == SIGKILLED, "the process was not killed: " + _explain(proc)


def _finished(proc) -> str:
    assert proc.returncode == 0, _explain(proc)
    return proc.stdout


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _last_step(out: Path) -> int:
    """Step of the run's last.pt (0: none yet); it must always be loadable."""
    path = out / "last.pt"
    return int(load_checkpoint(path)["step"]) if path.exists() else 0


def _resume_message(out: Path) -> str:
    """What a resumed run says it does with the last.pt left by the kill."""
    if not (out / "last.pt").exists():
        return "does not exist yet; starting a new run"
    return f"epoch {int(load_checkpoint(out / 'last.pt')['epoch']) + 1} of 3"


def _same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs from the uninterrupted run"


def _no_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.fixture(scope="module")
def reference(fault_env, tmp_path_factory) -> Path:
    """The uninterrupted run (also builds the density cache the other runs then read)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    out_text = _finished(_train(fault_env, out))
    assert "epoch 3/3" in out_text
    return out


def _assert_same_as_reference(out: Path, ref: Path) -> None:
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(out / "last.pt")
    assert (b["epoch"], b["step"], b["batch_in_epoch"]) == (3, TOTAL_STEPS, 0)
    _same_tensors(a["model"], b["model"], "last.pt weights")
    _same_tensors(a["ema"], b["ema"], "last.pt weight average")
    states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert states_a.keys() == states_b.keys()
    for key in states_a:
        _same_tensors(states_a[key], states_b[key], f"optimizer state {key}")
    assert a["scheduler"] == b["scheduler"]
    assert _no_seconds(a["history"]) == _no_seconds(b["history"])
    assert _no_seconds(read_history(out)) == _no_seconds(read_history(ref))
    best_a, best_b = load_checkpoint(ref / "best.pt"), load_checkpoint(out / "best.pt")
    assert best_a["epoch"] == best_b["epoch"] and best_a["val_mae"] == best_b["val_mae"]
    _same_tensors(best_a["model"], best_b["model"], "best.pt weights")
    assert _temps(out) == [], "temporary files of the killed writes were not cleaned up"


# --------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_training_killed_at_random_moments_resumes_bitwise(fault_env, reference, tmp_path, seed):
    """Killed twice at seeded random moments (the second time while resuming), then finished."""
    rng = random.Random(seed)
    out = tmp_path / "run"
    done = 0  # steps in last.pt
    kills = []
    for attempt in range(2):
        # the kill lands before this process's last step: it never finishes first
        after = rng.randint(1, TOTAL_STEPS - done - 1)
        plan = {"kind": "step", "after": after, "delay": round(rng.uniform(0.0, 0.03), 4)}
        expected = _resume_message(out)
        proc = _train(fault_env, out, plan, resume=attempt > 0)
        _killed(proc)
        if attempt > 0:  # it continued from last.pt, it did not start again
            assert expected in proc.stdout, (kills, proc.stdout)
        reached = done + after  # steps completed at the latest when the kill landed
        step = _last_step(out)
        kills.append((plan, step))
        # last.pt is the last checkpoint whose write completed: at least the one written before
        # the timer started, never one after the kill, never older than before
        surely_written = max([s for s in CHECKPOINT_STEPS if s < reached] + [done])
        assert surely_written <= step <= reached and step in (0, *CHECKPOINT_STEPS), kills
        # whatever a kill during a write left behind is recognised as stale
        assert _temps(out) == [p.name for p in stale_temp_files(out)]
        done = step
    expected = _resume_message(out)
    text = _finished(_train(fault_env, out, resume=True))
    assert expected in text, (kills, text)
    _assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_kills_while_writing_last_pt(fault_env, reference, tmp_path):
    out = tmp_path / "run"
    # 1. torn write: the third last.pt (step 8, mid-epoch 2) is half written when the kill lands
    _killed(_train(fault_env, out, {"kind": "write", "name": "last.pt", "mode": "torn", "nth": 3}))
    assert _last_step(out) == 6, "last.pt must still be the previous, complete checkpoint"
    (torn,) = stale_temp_files(out)
    assert torn.name.startswith(".last.pt.pid") and torn.name.endswith(".pt.tmp")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(torn)
    # 2. resumed, and killed after writing the second last.pt of this process (step 12, the end
    # of epoch 2) completely, before renaming it
    plan = {"kind": "write", "name": "last.pt", "mode": "unrenamed", "nth": 2}
    proc = _train(fault_env, out, plan, resume=True)
    _killed(proc)
    assert "epoch 2 of 3" in proc.stdout, proc.stdout
    assert _last_step(out) == 8
    (complete,) = stale_temp_files(out)  # the torn file of the first kill was removed
    assert complete != torn and load_checkpoint(complete)["step"] == 12
    assert load_checkpoint(out / "best.pt")["epoch"] <= 2
    # 3. resumed to the end
    assert "epoch 2 of 3" in _finished(_train(fault_env, out, resume=True))
    _assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_kills_while_writing_best_pt_and_history(fault_env, reference, tmp_path):
    out = tmp_path / "run"
    # 1. the first best.pt (end of epoch 1, written before last.pt) is never renamed
    _killed(_train(fault_env, out, {"kind": "write", "name": "best.pt", "mode": "unrenamed",
                                    "nth": 1}))
    assert not (out / "best.pt").exists() and _last_step(out) == 4
    (unrenamed,) = stale_temp_files(out)
    assert unrenamed.name.startswith(".best.pt.pid") and load_checkpoint(unrenamed)["epoch"] == 1
    # 2. resumed (epoch 1 from batch 2), killed while replacing history.csv at the end of epoch 1
    # (the second history.csv of this process): last.pt and best.pt are already written
    plan = {"kind": "write", "name": "history.csv", "mode": "unrenamed", "nth": 2}
    proc = _train(fault_env, out, plan, resume=True)
    _killed(proc)
    assert "epoch 1 of 3" in proc.stdout, proc.stdout
    assert _last_step(out) == 6 and load_checkpoint(out / "best.pt")["epoch"] == 1
    assert read_history(out) == []  # behind last.pt: the next run rewrites it from last.pt
    (unrenamed,) = stale_temp_files(out)  # the best.pt of the first kill was removed
    assert unrenamed.name.startswith(".history.csv.pid") and len(read_history(unrenamed)) == 1
    # 3. resumed to the end
    assert "epoch 2 of 3" in _finished(_train(fault_env, out, resume=True))
    _assert_same_as_reference(out, reference)


# --------------------------------------------------------------------------- density cache


@pytest.fixture()
def cache_env(fault_env, tiny_shtech, tmp_path, monkeypatch):
    """A fresh, empty cache for this test, in this process and in the subprocess."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CROWD_CACHE", str(cache))
    monkeypatch.setenv("CROWD_DATA", str(tiny_shtech))
    records = data.list_records("B", "train", root=tiny_shtech)
    return dict(fault_env, CROWD_CACHE=str(cache)), cache, records


BUILD_ARGS = ["build", "--part", "B", "--split", "train", "--no-progress"]


def _assert_cache_complete(cache: Path, records) -> None:
    params = density.DensityParams()
    assert _temps(cache) == [], "temporary files of the killed build were not cleaned up"
    for record in records:
        assert density_cache.cache_status(record, params) == "fresh", record.name
        np.testing.assert_array_equal(density_cache.load_density(record, params, build=False),
                                      density.compute_density(record, params))
    again = density_cache.build_cache(records, params, progress=False)
    assert again["skipped_fresh"] == len(records)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_cache_build_killed_at_a_random_moment(cache_env, seed):
    env, cache, records = cache_env
    rng = random.Random(seed)
    # 12 maps at >= 50 ms each; killed 0-250 ms after the first file appeared
    proc = _drive(env, {"kind": "slow_maps", "sleep": 0.05}, "density",
                  [*BUILD_ARGS, "--root", env["CROWD_DATA"]], popen=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not any(cache.rglob("*.h5")):
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.25))
    proc.kill()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == SIGKILLED, f"the build was not killed mid-way:\n{out}\n{err}"
    params = density.DensityParams()
    before = [density_cache.cache_status(r, params) for r in records]
    assert "fresh" in before and before.count("fresh") < len(records), before
    stats = density_cache.build_cache(records, params, progress=False)
    assert stats["skipped_fresh"] == before.count("fresh")
    assert stats["built"] + stats["rebuilt_stale"] == len(records) - before.count("fresh")
    _assert_cache_complete(cache, records)


def _open_hdf5_snapshot(path: Path, like: Path) -> None:
    """Write at ``path`` what a writer killed inside HDF5 leaves: the bytes of a file still open
    for writing, its map flushed, its attributes never written."""
    scratch = path.with_name("scratch.h5")
    with h5py.File(like, "r") as src, h5py.File(scratch, "w") as fh:
        fh.create_dataset("density", data=src["density"][()], chunks=True, **density_cache.COMPRESSION)
        fh.flush()
        path.write_bytes(scratch.read_bytes())  # copied before the file is closed
    scratch.unlink()


@pytest.mark.slow
def test_cache_partial_and_damaged_files_are_rebuilt(cache_env):
    env, cache, records = cache_env
    params = density.DensityParams()
    # killed after writing the third map completely to its temporary file, before the rename
    plan = {"kind": "write", "name": "*.h5", "mode": "unrenamed", "nth": 3}
    _killed(_drive(env, plan, "density", [*BUILD_ARGS, "--root", env["CROWD_DATA"]]))
    paths = [density_cache.cache_path(r, params) for r in records]
    assert [p.is_file() for p in paths[:3]] == [True, True, False]
    (leftover,) = stale_temp_files(paths[2].parent)
    assert leftover.name.startswith(f".{paths[2].name}.pid")
    # Files that a kill with a non-atomic writer, a copy or a hand edit can leave at the final
    # names; none of them may be taken for a good map:
    raw = leftover.read_bytes()
    paths[2].write_bytes(raw[: len(raw) // 2])  # a torn write
    _open_hdf5_snapshot(paths[0], like=paths[1])  # killed inside HDF5, file never closed
    with h5py.File(paths[1], "a") as fh:  # attributes that do not fit the data
        fh.attrs["height"] = int(fh.attrs["height"]) + 1
    with h5py.File(paths[3], "w") as fh:  # the right attributes, but no map
        fh.attrs.update(density_cache._expected_attrs(records[3], params))
    status = [density_cache.cache_status(r, params) for r in records]
    assert status == ["stale"] * 4 + ["missing"] * (len(records) - 4)
    # loading a damaged map rebuilds it instead of crashing
    np.testing.assert_array_equal(density_cache.load_density(records[3], params),
                                  density.compute_density(records[3], params))
    stats = density_cache.build_cache(records, params, progress=False)
    assert (stats["rebuilt_stale"], stats["built"], stats["skipped_fresh"]) == (
        3, len(records) - 4, 1)
    assert not leftover.exists()
    _assert_cache_complete(cache, records)


def test_stale_temp_files_spare_running_writers(tmp_path):
    """Only temporary files whose writer process has ended are stale."""
    from helpers.tools.fileio import atomic_path, remove_stale_temp_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    leftover = tmp_path / f".last.pt.pid{dead_pid}.ab_12xyz.pt.tmp"
    leftover.write_bytes(b"half a checkpoint")
    other = tmp_path / ".notes.txt.tmp"  # not written by atomic_path: never touched
    other.write_text("keep")
    with atomic_path(tmp_path / "last.pt", suffix=".pt") as tmp:
        tmp.write_bytes(b"being written")
        assert stale_temp_files(tmp_path) == [leftover]  # our own temporary file is spared
        assert remove_stale_temp_files(tmp_path) == [leftover]
        assert tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.tmp", "last.pt"]
