"""``benchmarks/accuracy.py --summary``: each run's numbers and their mean and spread, checked
against numpy on made-up run folders (the training itself is tested in tests/test_shipped.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _accuracy_module():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(folder: Path, seed: int, val: float, test: float, bias: float, loss: str = "mse") -> Path:
    folder.mkdir(parents=True)
    record = {"part": "B", "epochs_done": 30, "epochs_planned": 30, "best_epoch": 20, "val_mae": val,
              "val_bias": 0.5, "test_mae": test, "test_rmse": 2 * test, "test_bias": bias,
              "settings": {"seed": seed, "loss": loss}}
    (folder / "accuracy.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


def test_summary_gives_each_run_and_the_mean_and_spread(tmp_path, capsys):
    accuracy = _accuracy_module()
    numbers = [(0, 18.0, 21.0, -2.0), (1, 19.5, 22.5, 1.0), (2, 17.25, 24.0, 4.5)]
    runs = [_fake_run(tmp_path / f"seed_{s}", s, v, t, b) for s, v, t, b in numbers]
    runs.append(_fake_run(tmp_path / "old", 3, 20.0, 20.0, 0.0, loss="mean"))  # a run from before --reduction
    assert accuracy.main(["--summary", *map(str, runs)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tests = np.array([t for _, _, t, _ in numbers] + [20.0])
    assert printed["test_mae"]["mean"] == pytest.approx(tests.mean(), rel=1e-12)
    assert printed["test_mae"]["std"] == pytest.approx(tests.std(ddof=1), rel=1e-12)
    assert (printed["test_mae"]["min"], printed["test_mae"]["max"]) == (20.0, 24.0)
    assert printed["val_mae"]["mean"] == pytest.approx(np.mean([18.0, 19.5, 17.25, 20.0]), rel=1e-12)
    assert [r["seed"] for r in printed["runs"]] == [0, 1, 2, 3] and printed["runs"][3]["loss"] == "mse"


def test_summary_of_an_unfinished_run_is_an_error(tmp_path, capsys):
    accuracy = _accuracy_module()
    (tmp_path / "half").mkdir()
    assert accuracy.main(["--summary", str(tmp_path / "half")]) == 1
    assert "accuracy.json is missing" in capsys.readouterr().err
