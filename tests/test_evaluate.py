"""Evaluation on a split: per-image rows, aggregates, CSV/JSON files, the command, result tables."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.data import list_records, read_points
from helpers.models import HeatmapCNN
from helpers.tools import cli, evaluate
from helpers.tools.checkpoints import save_checkpoint
from helpers.tools.synth import write_points_mat

H, W = 96, 128
N_TEST, N_TRAIN = 6, 4


def _write_split(root: Path, split: str, n: int, rng: np.random.Generator) -> None:
    images = root / "part_B" / f"{split}_data" / "images"
    gts = root / "part_B" / f"{split}_data" / "ground-truth"
    images.mkdir(parents=True)
    gts.mkdir(parents=True)
    for i in range(1, n + 1):
        k = int(rng.integers(2, 60))
        pts = np.column_stack([rng.uniform(0, W, k), rng.uniform(0, H, k)])
        img = (rng.random((H, W, 3)) * 60 + 100).astype(np.uint8)
        for x, y in pts:
            img[max(0, int(y) - 2) : int(y) + 3, max(0, int(x) - 2) : int(x) + 3] = 20
        Image.fromarray(img).save(images / f"IMG_{i}.jpg", quality=90)
        write_points_mat(gts / f"GT_IMG_{i}.mat", pts)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A ShanghaiTech-layout part B: 6 test and 4 train images of 96 x 128 with 2-59 heads."""
    root = tmp_path_factory.mktemp("tiny_eval")
    rng = np.random.default_rng(7)
    _write_split(root, "test", N_TEST, rng)
    _write_split(root, "train", N_TRAIN, rng)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random HeatmapCNN (width 8) saved like helpers.train, trained 'at' resize 0.5."""
    torch.manual_seed(0)
    model = HeatmapCNN(width=8, init_output=30.0)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_name": "heatmap_cnn",
                           "model_kwargs": {"width": 8}, "scale": 100.0, "epoch": 1,
                           "config": {"resize": 0.5, "part": "B"}})
    return path


@pytest.fixture()
def env(tiny_root, tmp_path, monkeypatch) -> dict[str, str]:
    values = {"CROWD_DATA": str(tiny_root), "CROWD_HOME": str(tmp_path / "home"),
              "CROWD_CACHE": str(tmp_path.parent / "eval_cache")}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CROWD_QUICK", raising=False)
    monkeypatch.delenv("CROWD_DEVICE", raising=False)
    full = {k: v for k, v in os.environ.items() if not k.startswith("CROWD_")}
    full.update(values)
    full["OMP_NUM_THREADS"] = "1"
    return full


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def result(tiny_root, tiny_ckpt):
    return evaluate.evaluate_checkpoint(tiny_ckpt, "B", "test", root=tiny_root, device="cpu",
                                        keep_maps=2, keep_names=["IMG_3"], progress=False)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_aggregates_equal_numpy_computations_from_the_csv(result, tiny_root, tmp_path):
    path = evaluate.write_csv(result, tmp_path / "rows.csv")
    rows = _read_rows(path)
    assert [r["name"] for r in rows] == [f"IMG_{i}" for i in range(1, N_TEST + 1)]
    true = np.array([float(r["true_count"]) for r in rows])
    pred = np.array([float(r["pred_count"]) for r in rows])
    # true counts are the annotation files' point counts (all points lie inside the image)
    recs = list_records("B", "test", tiny_root)
    assert true.tolist() == [len(read_points(r.points_path)) for r in recs]
    s = result.summary
    assert s["images"] == N_TEST
    assert s["mae"] == pytest.approx(np.mean(np.abs(pred - true)), rel=1e-12)
    assert s["rmse"] == pytest.approx(np.sqrt(np.mean((pred - true) ** 2)), rel=1e-12)
    assert s["mre"] == pytest.approx(np.mean(np.abs(pred - true) / true), rel=1e-12)
    assert s["bias"] == pytest.approx(np.mean(pred - true), rel=1e-12)
    for level in range(4):
        assert s["game"][str(level)] == pytest.approx(np.mean([float(r[f"game{level}"]) for r in rows]))
    # GAME(0) is the count error (the map sums to the count); GAME grows with the level
    g = np.array([[float(r[f"game{lv}"]) for lv in range(4)] for r in rows])
    np.testing.assert_allclose(g[:, 0], np.abs(pred - true), rtol=1e-4, atol=1e-3)
    assert (np.diff(g, axis=1) >= -1e-6).all()
    for radius in ("4", "8", "16"):
        tp, fp, fn = (sum(int(r[f"{k}_r{radius}"]) for r in rows) for k in ("tp", "fp", "fn"))
        assert tp + fn == true.sum()  # every annotated head is matched or missed
        scores = s["localization"]["per_radius"][radius]
        assert scores["precision"] == pytest.approx(tp / (tp + fp))
        assert scores["recall"] == pytest.approx(tp / (tp + fn))
        assert scores["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    per = s["localization"]["per_radius"]
    assert s["localization"]["f1"] == pytest.approx(np.mean([per[r]["f1"] for r in ("4", "8", "16")]))
    # buckets: MAE of the images in each bucket
    for b in s["buckets"]:
        sel = np.array([r["bucket"] == b["bucket"] for r in rows])
        assert b["images"] == sel.sum()
        assert b["mae"] == pytest.approx(np.mean(np.abs(pred[sel] - true[sel])))
    # the same numbers come back from the CSV alone
    again = evaluate.summarize(evaluate.read_csv(path))
    for key in ("mae", "rmse", "mre"):
        assert again[key] == pytest.approx(s[key], rel=1e-12)
    assert again["localization"]["per_radius"]["8"] == s["localization"]["per_radius"]["8"]


def test_counts_match_training_validation_at_the_checkpoint_resize(result, tiny_root, tiny_ckpt, env):
    from helpers.samples import CrowdDataset
    from helpers.tools.checkpoints import load_model
    from helpers.train import evaluate_counts

    assert result.summary["settings"]["resize"] == 0.5
    model, info = load_model(tiny_ckpt, "cpu")
    ds = CrowdDataset(list_records("B", "test", tiny_root), mode="eval", resize=0.5)
    reference = evaluate_counts(model, ds, scale=info.scale, device="cpu")
    np.testing.assert_allclose(result.pred_counts, reference["pred"], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(result.true_counts, reference["true"])


def test_game1_by_hand_and_kept_images(result):
    errors = {r["name"]: r["abs_error"] for r in result.rows}
    order = sorted(errors, key=errors.get)
    assert [k.name for k in result.best] == order[:2]
    assert [k.name for k in result.worst] == order[::-1][:2]
    assert set(result.named) == {"IMG_3"}
    for kept in result.kept:
        assert kept.image.shape == (H, W, 3) and kept.density.shape == (H, W)
        assert kept.density.sum() == pytest.approx(kept.pred_count, rel=1e-4)
        pts = kept.points
        assert ((pts >= 0) & (pts < [W, H])).all()
        # GAME(1) by hand: four 48 x 64 quadrants, a head at (x, y) lies in pixel (int(y), int(x))
        d, t = kept.density.astype(np.float64), kept.true_points
        total = 0.0
        for r0, r1 in ((0, 48), (48, 96)):
            for c0, c1 in ((0, 64), (64, 128)):
                inside = (t[:, 1] >= r0) & (t[:, 1] < r1) & (t[:, 0] >= c0) & (t[:, 0] < c1)
                total += abs(d[r0:r1, c0:c1].sum() - inside.sum())
        assert kept.row["game1"] == pytest.approx(total, rel=1e-6)


def test_predictor_without_map_or_points_and_a_perfect_predictor(tiny_root):
    from helpers.data import load_example

    records = list_records("B", "test", tiny_root)
    truth = {}
    for r in records:
        ex = load_example(r)
        truth[ex.image.tobytes()] = ex.points

    def perfect(image):
        """The true points, and a map with one person in the pixel of each head."""
        pts = truth[image.tobytes()]
        density = np.zeros(image.shape[:2])
        np.add.at(density, (pts[:, 1].astype(int), pts[:, 0].astype(int)), 1.0)
        return float(len(pts)), density, pts

    res = evaluate.evaluate_predictor(perfect, records, name="perfect", progress=False)
    assert res.summary["mae"] == 0.0 and res.summary["rmse"] == 0.0
    assert res.summary["game"] == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0}
    for scores in res.summary["localization"]["per_radius"].values():
        assert scores["f1"] == 1.0

    res = evaluate.evaluate_predictor(lambda image: (10.0, None, None), records, name="ten",
                                      progress=False)
    assert res.summary["game"] is None and res.summary["localization"] is None
    assert res.summary["mae"] == pytest.approx(np.mean(np.abs(10.0 - res.true_counts)))
    text = evaluate.csv_text(res)
    assert text.splitlines()[1].split(",")[6:10] == ["", "", "", ""]  # game0..3 empty


def test_quick_mode_limit_and_buckets(tiny_root, monkeypatch):
    monkeypatch.setattr(evaluate, "QUICK_IMAGES", 3)
    monkeypatch.setenv("CROWD_QUICK", "1")
    assert [r.name for r in evaluate.select_records("B", "test", tiny_root)] == ["IMG_1", "IMG_3", "IMG_6"]
    monkeypatch.delenv("CROWD_QUICK")
    assert len(evaluate.select_records("B", "test", tiny_root)) == N_TEST
    assert len(evaluate.select_records("B", "test", tiny_root, limit=2)) == 2
    assert evaluate.bucket_labels() == ["0-49", "50-99", "100-249", "250-499", "500-999", "1000+"]
    assert [evaluate.bucket_of(c) for c in (0, 49, 50, 999, 1000, 5000)] == [
        "0-49", "0-49", "50-99", "500-999", "1000+", "1000+"]


def test_results_table_and_files(result, tmp_path):
    from helpers.tools.baselines import published_summaries

    results = {"tiny": result, **published_summaries("B")}
    table = evaluate.results_table(results)
    lines = table.strip().splitlines()
    assert "MSE" in lines[0] and "GAME(3)" in lines[0] and "F1 @ 8 px" in lines[0]
    assert len(lines) == 2 + 1 + 4
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    s = result.summary
    assert first[:4] == ["tiny", str(N_TEST), f"{s['mae']:.1f}", f"{s['rmse']:.1f}"]
    assert first[7] == f"{s['localization']['per_radius']['8']['f1']:.3f}"
    csr = next(line for line in lines if line.startswith("| CSRNet"))
    assert "10.6" in csr and "16.0" in csr and csr.count("–") == 5
    md, js = evaluate.write_results(results, tmp_path / "report")
    assert md.read_text().startswith("# Results") and table in md.read_text()
    data = json.loads(js.read_text())
    assert data["tiny"]["mae"] == pytest.approx(s["mae"])


def _run(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "helpers", "evaluate", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_prints_json_and_writes_csv_next_to_the_checkpoint(env, tiny_ckpt, tmp_path):
    proc = _run(["--checkpoint", str(tiny_ckpt), "--part", "B", "--device", "cpu", "--limit", "3"], env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["images"] == 3 and "MSE" in out["note"]
    csv_path = Path(out["csv"])
    assert csv_path == tiny_ckpt.parent / "eval_B_test_n3.csv"
    rows = _read_rows(csv_path)
    assert len(rows) == 3
    err = np.array([float(r["abs_error"]) for r in rows])
    assert out["mae"] == pytest.approx(err.mean(), rel=1e-12)
    assert json.loads(Path(out["json"]).read_text())["mae"] == pytest.approx(out["mae"])


def test_cli_bad_checkpoint_and_bad_dataset_exit_1(env, tmp_path, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli.main(["evaluate", "--checkpoint", str(bad), "--part", "B", "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "broken.pt" in err
    assert cli.main(["evaluate", "--baseline", "mean", "--part", "B", "--data-root", str(tmp_path / "nowhere")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "nowhere" in err
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--baseline", "mean", "--part", "C"])
    assert stop.value.code == 1 and capsys.readouterr().err.startswith("error: ")


def test_cli_mean_baseline_in_process(env, tmp_path, capsys):
    assert cli.main(["evaluate", "--baseline", "mean", "--part", "B", "--csv", str(tmp_path / "m.csv")]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = _read_rows(tmp_path / "m.csv")
    assert out["images"] == N_TEST == len(rows)
    assert out["settings"]["fit_images"] == N_TRAIN - 1  # fit = train minus the validation image
    assert out["game"] is not None and out["localization"] is None
    assert {float(r["pred_count"]) for r in rows} == {out["settings"]["mean_count"]}


def test_localization_accumulator_is_micro_average():
    acc = evaluate.LocalizationAccumulator(radii=(4,))
    pts = np.array([[0.0, 0.0], [20.0, 20.0]])
    acc.add(pts, pts)  # tp 2
    acc.add(None, np.array([[1.0, 1.0], [2.0, 9.0], [9.0, 2.0]]))  # fn 3
    s = acc.scores()
    assert s["images"] == 2
    per = s["per_radius"][4.0]
    assert (per["tp"], per["fp"], per["fn"]) == (2, 0, 3)
    assert s["precision"] == pytest.approx(1.0)
    assert s["recall"] == pytest.approx(2 / 5)
    assert s["f1"] == pytest.approx(4 / 7)  # the mean of per-image F1s would be 0.5


def test_localization_accumulator_means_over_radii():
    acc = evaluate.LocalizationAccumulator(radii=(1, 2, 4))
    acc.add([[0.0, 0.0]], [[1.5, 0.0]])
    res = acc.scores()
    assert res["per_radius"][1.0]["tp"] == 0
    assert res["per_radius"][2.0]["tp"] == 1 and res["per_radius"][4.0]["tp"] == 1
    assert res["f1"] == pytest.approx(2 / 3)
    assert res["precision"] == pytest.approx(2 / 3) and res["recall"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="radius"):
        evaluate.LocalizationAccumulator(radii=())
