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
from helpers.density import density_map
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


pytestmark = pytest.mark.usefixtures("one_thread", "own_cache")  # one_thread: tests/conftest.py


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    """The density cache of this module's evaluations (the true maps of GAME), not the project's."""
    return tmp_path_factory.mktemp("eval_density_cache")


@pytest.fixture()
def own_cache(cache_root, monkeypatch):
    monkeypatch.setenv("CROWD_CACHE", str(cache_root))


@pytest.fixture(scope="module")
def result(tiny_root, tiny_ckpt, cache_root):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROWD_CACHE", str(cache_root))
        return evaluate.evaluate_checkpoint(tiny_ckpt, "B", "test", root=tiny_root, device="cpu",
                                            keep_maps=2, keep_names=["IMG_3"], progress=False)


def _region_sums(a: np.ndarray, level: int) -> np.ndarray:
    """Sums of the 2^L x 2^L equal blocks of an H x W map (H, W divisible by 2^L), by reshaping."""
    n = 2**level
    return a.reshape(n, a.shape[0] // n, n, a.shape[1] // n).sum(axis=(1, 3))


def _dots(points: np.ndarray, shape) -> np.ndarray:
    """A map with one person in the pixel of each head: (x, y) lies in pixel (int(y), int(x))."""
    dots = np.zeros(shape)
    np.add.at(dots, (points[:, 1].astype(int), points[:, 0].astype(int)), 1.0)
    return dots


@pytest.fixture(scope="module")
def points_of(tiny_root) -> dict[bytes, np.ndarray]:
    """The true points of each test image, by the image's bytes (what a predictor is given)."""
    from helpers.data import load_example

    examples = [load_example(r) for r in list_records("B", "test", tiny_root)]
    return {ex.image.tobytes(): ex.points for ex in examples}


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
    for key, suffix in (("game", ""), ("game_points", "_points")):
        for level in range(4):
            assert s[key][str(level)] == pytest.approx(np.mean([float(r[f"game{level}{suffix}"]) for r in rows]))
        # GAME(0) is the count error (both truths sum to the count); GAME grows with the level
        g = np.array([[float(r[f"game{lv}{suffix}"]) for lv in range(4)] for r in rows])
        np.testing.assert_allclose(g[:, 0], np.abs(pred - true), rtol=1e-4, atol=1e-3)
        assert (np.diff(g, axis=1) >= -1e-6).all()
    assert s["conventions"]["game"].startswith("GAME(L) against the ground-truth density maps")
    for column in ("r4", "r8", "r16", "p2p0.5", "p2p0.25"):
        tp, fp, fn = (sum(int(r[f"{k}_{column}"]) for r in rows) for k in ("tp", "fp", "fn"))
        assert tp + fn == true.sum()  # every annotated head is matched or missed
        loc = s["localization"]
        scores = loc["per_radius"][column[1:]] if column[0] == "r" else loc["per_delta"][column[3:]]
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
    assert again["localization"]["per_delta"] == s["localization"]["per_delta"]
    assert again["game"] == pytest.approx(s["game"]) and again["game_points"] == pytest.approx(s["game_points"])


def test_csv_columns_name_both_conventions(result):
    header = evaluate.csv_text(result).splitlines()[0].split(",")
    games = [f"game{lv}" for lv in range(4)] + [f"game{lv}_points" for lv in range(4)]
    matches = [f"{k}_{c}" for c in ("r4", "r8", "r16", "p2p0.5", "p2p0.25") for k in ("tp", "fp", "fn")]
    assert header == ["name", "true_count", "pred_count", "error", "abs_error", "bucket", *games, *matches,
                      "seconds"]


def test_old_csvs_with_point_game_are_read_as_point_game():
    """CSVs written before the density GAME had point GAME in game0..3 and no p2p columns."""
    rows = [{"name": "a", "true_count": 10, "pred_count": 12.0, "error": 2.0, "abs_error": 2.0,
             "bucket": "0-49", "game0": 2.0, "game1": 3.0, "game2": 5.0, "game3": 9.0,
             "tp_r8": 1, "fp_r8": 2, "fn_r8": 9, "seconds": 0.1}]
    s = evaluate.summarize(rows, radii=(8,))
    assert s["game"] is None and s["game_points"] == {"0": 2.0, "1": 3.0, "2": 5.0, "3": 9.0}
    assert s["localization"]["per_radius"]["8"]["tp"] == 1 and s["localization"]["per_delta"] is None
    cells = [c.strip() for c in evaluate.results_table({"old": s}).splitlines()[2].strip("|").split("|")]
    assert cells[4:] == ["–", "–", "–", "9.0", f"{2 / (2 + 2 + 9):.3f}", "–"]


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
        assert kept.row["game1_points"] == pytest.approx(total, rel=1e-6)
        # against the true density map (default adaptive kernels): its mass per quadrant
        truth = density_map(t, (H, W)).astype(np.float64)
        by_hand = np.abs(_region_sums(d, 1) - _region_sums(truth, 1)).sum()
        assert kept.row["game1"] == pytest.approx(by_hand, rel=1e-6)


def test_checkpoint_points_refined_within_their_cells(result, tiny_root, tiny_ckpt):
    """Refined points: the same peaks as the cell centres of helpers.predict.count, each moved to
    the centroid of its 3 x 3 cells, i.e. by less than one cell (16 px here: stride 8 at resize
    0.5) on each axis; the count does not change."""
    from helpers.data import load_example

    plain = evaluate.CheckpointPredictor(tiny_ckpt, device="cpu", refine=False)
    refined = evaluate.CheckpointPredictor(tiny_ckpt, device="cpu")
    assert refined.refine and result.summary["settings"]["refine"] is True
    image = load_example(list_records("B", "test", tiny_root)[2]).image
    (count_a, _, centres), (count_b, _, points) = plain(image), refined(image)
    assert count_a == count_b and len(centres) == len(points) > 0
    cell = 8 / plain.resize
    assert np.all(np.abs(points - centres) <= cell) and np.any(np.abs(points - centres) > 1e-6)
    assert np.all(((centres / cell) - 0.5) % 1 == 0)  # unrefined: cell centres


def test_predictor_without_map_or_points_and_a_perfect_predictor(tiny_root, points_of):
    records = list_records("B", "test", tiny_root)

    def perfect(image):
        """The true points, and a map with one person in the pixel of each head."""
        pts = points_of[image.tobytes()]
        return float(len(pts)), _dots(pts, image.shape[:2]), pts

    res = evaluate.evaluate_predictor(perfect, records, name="perfect", progress=False)
    assert res.summary["mae"] == 0.0 and res.summary["rmse"] == 0.0
    assert res.summary["game_points"] == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0}
    for scores in [*res.summary["localization"]["per_radius"].values(),
                   *res.summary["localization"]["per_delta"].values()]:
        assert scores["f1"] == 1.0

    res = evaluate.evaluate_predictor(lambda image: (10.0, None, None), records, name="ten",
                                      progress=False)
    assert res.summary["game"] is None and res.summary["game_points"] is None
    assert res.summary["localization"] is None
    assert res.summary["mae"] == pytest.approx(np.mean(np.abs(10.0 - res.true_counts)))
    text = evaluate.csv_text(res)
    assert text.splitlines()[1].split(",")[6:14] == [""] * 8  # game0..3 and game0..3_points empty


def test_the_two_games_on_images_where_the_answer_is_known(tiny_root, points_of):
    """A map with one person in each head's pixel is perfect for point GAME; the true density map
    is perfect for density GAME; each scores on the other's truth the sum over regions of
    |heads - true mass|, computed here by reshaping the maps into blocks."""
    records = list_records("B", "test", tiny_root)

    def dots(image):
        pts = points_of[image.tobytes()]
        return float(len(pts)), _dots(pts, image.shape[:2]), None

    def gaussians(image):
        pts = points_of[image.tobytes()]
        return float(len(pts)), density_map(pts, image.shape[:2]), None

    on_dots = evaluate.evaluate_predictor(dots, records, progress=False)
    on_maps = evaluate.evaluate_predictor(gaussians, records, progress=False)
    for row_d, row_m, pts in zip(on_dots.rows, on_maps.rows, points_of.values(), strict=True):
        truth = density_map(pts, (H, W)).astype(np.float64)
        for level in range(4):
            expected = np.abs(_region_sums(_dots(pts, (H, W)), level) - _region_sums(truth, level)).sum()
            assert row_d[f"game{level}_points"] == 0.0 and row_m[f"game{level}"] <= 1e-4
            assert row_d[f"game{level}"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
            assert row_m[f"game{level}_points"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert row_d["game3"] > row_d["game1"] > 0  # Gaussians cross the region borders
    assert on_dots.summary["localization"] is None


def test_true_density_comes_from_the_cache_or_is_computed(tiny_root, cache_root, tmp_path, monkeypatch):
    from helpers.errors import CacheError
    from helpers.tools import cache

    record = list_records("B", "test", tiny_root)[0]
    expected = density_map(read_points(record.points_path), (H, W))
    np.testing.assert_array_equal(evaluate.true_density(record), expected)
    assert cache.cache_status(record) == "fresh"

    def refuse(*args, **kwargs):
        raise CacheError("read-only cache")

    monkeypatch.setattr(cache, "load_density", refuse)
    np.testing.assert_array_equal(evaluate.true_density(record), expected)


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
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[2:] == ["MAE", 'RMSE (papers: "MSE")', "GAME(1), density GT", "GAME(2), density GT",
                          "GAME(3), density GT", "point GAME(3)", "F1 @ 8 px", "F1 (P2PNet, δ=0.5)"]
    assert len(lines) == 2 + 1 + 4
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    s = result.summary
    assert first[:4] == ["tiny", str(N_TEST), f"{s['mae']:.1f}", f"{s['rmse']:.1f}"]
    assert first[4:8] == [f"{s['game'][lv]:.1f}" for lv in "123"] + [f"{s['game_points']['3']:.1f}"]
    assert first[8] == f"{s['localization']['per_radius']['8']['f1']:.3f}"
    assert first[9] == f"{s['localization']['per_delta']['0.5']['f1']:.3f}"
    csr = next(line for line in lines if line.startswith("| CSRNet"))
    assert "10.6" in csr and "16.0" in csr and csr.count("–") == 7
    md, js = evaluate.write_results(results, tmp_path / "report")
    assert md.read_text().startswith("# Results") and table in md.read_text()
    assert "density GT" in md.read_text() and "point GAME" in md.read_text() and "P2PNet" in md.read_text()
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


def test_localization_accumulator_p2pnet_thresholds_by_hand():
    """Four heads 10 px apart in a row: d (mean distance to the 3 nearest) is 20 px for the end
    heads and 13.3 px for the inner ones; each prediction sits straight below its head, so it is
    at least 10 px from every other head and only its own radius delta x d decides."""
    true = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0]])
    d = np.array([(10 + 20 + 30) / 3, (10 + 10 + 20) / 3, (10 + 10 + 20) / 3, (10 + 20 + 30) / 3])
    offsets = np.array([9.0, 6.0, 7.0, 3.0])
    acc = evaluate.LocalizationAccumulator(radii=(8,), deltas=(0.5, 0.25))
    out = acc.add(true + np.column_stack([np.zeros(4), offsets]), true)
    assert set(out) == {"r8", "p2p0.5", "p2p0.25"}
    for delta in (0.5, 0.25):
        assert out[f"p2p{delta:g}"].tp == int(np.sum(offsets <= delta * d)), delta
    scores = acc.scores()
    assert scores["per_delta"][0.5]["tp"] == 3 and scores["per_delta"][0.25]["tp"] == 1  # 9 <= 10, 6 <= 6.7, 3 <= 10
    assert scores["per_radius"][8.0]["tp"] == 3
