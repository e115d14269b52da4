"""Baselines: the mean-count predictor, the HOG people detector, and the published numbers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers.data import ImageRecord
from helpers.tools import baselines
from helpers.tools.baselines import (
    PUBLISHED_RESULTS,
    HogPeopleDetector,
    MeanCountBaseline,
    non_max_suppression,
    published,
    published_summaries,
)
from helpers.tools.evaluate import evaluate_predictor
from helpers.tools.synth import write_points_mat

needs_hog = pytest.mark.skipif(
    not baselines.hog_available(),
    reason="this OpenCV has no HOGDescriptor (OpenCV 5 moved it out); install opencv-python-headless<5",
)


def _records(folder, counts, h=40, w=50, seed=0):
    """Images of h x w with ``counts[i]`` random points each, as records."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, n in enumerate(counts):
        pts = np.column_stack([rng.uniform(0, w, n), rng.uniform(0, h, n)])
        image_path, points_path = folder / f"IMG_{i}.png", folder / f"IMG_{i}.mat"
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(image_path)
        write_points_mat(points_path, pts)
        records.append(ImageRecord(f"IMG_{i}", image_path, points_path))
    return records


def test_mean_baseline_mae_equals_a_hand_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("CROWD_CACHE", str(tmp_path / "cache"))  # evaluation caches true density maps
    fit = _records(tmp_path / "fit", [10, 20, 33])
    test = _records(tmp_path / "test", [0, 5, 21, 40], seed=1)
    model = MeanCountBaseline().fit(fit)
    assert model.mean_count == pytest.approx(21.0) and model.n_fit == 3
    count, density, points = model(np.zeros((40, 50, 3), np.uint8))
    assert count == 21.0 and points is None
    assert density.shape == (40, 50) and density.sum() == pytest.approx(21.0, rel=1e-6)
    assert np.ptp(density) == 0  # uniform
    res = evaluate_predictor(model, test, name="mean", progress=False)
    # |21 - 0| + |21 - 5| + |21 - 21| + |21 - 40| = 21 + 16 + 0 + 19 = 56 over 4 images
    assert res.summary["mae"] == pytest.approx(56 / 4)
    assert res.summary["rmse"] == pytest.approx(np.sqrt((21**2 + 16**2 + 0 + 19**2) / 4))
    assert res.summary["game"]["0"] == pytest.approx(56 / 4, rel=1e-5)
    assert res.summary["localization"] is None


def test_mean_baseline_needs_fitting():
    from helpers.errors import CrowdError

    with pytest.raises(CrowdError, match="fit"):
        MeanCountBaseline()(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(CrowdError):
        MeanCountBaseline().fit_counts([])


def test_non_max_suppression_by_hand():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 10, 10], [0, 0, 10, 10.0]])
    scores = np.array([0.5, 0.9, 0.3, 0.1])
    # box 1 (best) overlaps box 0 with IoU 81 / 119 = 0.68 and box 3 likewise; box 2 is separate
    assert non_max_suppression(boxes, scores, 0.5).tolist() == [1, 2]
    assert non_max_suppression(boxes, scores, 0.7).tolist() == [1, 0, 2]  # 0 and 3 coincide (IoU 1)
    assert non_max_suppression(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def _draw_person(image: np.ndarray, cx: float, top: float, height: float, colour=(40, 40, 40)) -> None:
    """An upright dark silhouette: head, neck, torso, arms and legs, ``height`` pixels tall."""
    import cv2

    u = height / 8.0
    cv2.circle(image, (int(cx), int(top + 0.55 * u)), int(0.55 * u), colour, -1)
    cv2.rectangle(image, (int(cx - 0.45 * u), int(top + u)), (int(cx + 0.45 * u), int(top + 1.3 * u)), colour, -1)
    torso = [[cx - 1.1 * u, top + 1.3 * u], [cx + 1.1 * u, top + 1.3 * u], [cx + 0.9 * u, top + 4.2 * u],
             [cx - 0.9 * u, top + 4.2 * u]]
    cv2.fillPoly(image, [np.array(torso, np.int32)], colour)
    for s in (-1, 1):
        arm = [[cx + s * 1.1 * u, top + 1.3 * u], [cx + s * 1.45 * u, top + 1.5 * u],
               [cx + s * 1.35 * u, top + 4.3 * u], [cx + s * 1.05 * u, top + 4.3 * u]]
        leg = [[cx + s * 0.1 * u, top + 4.2 * u], [cx + s * 0.85 * u, top + 4.2 * u],
               [cx + s * 0.75 * u, top + 8 * u], [cx + s * 0.2 * u, top + 8 * u]]
        cv2.fillPoly(image, [np.array(arm, np.int32)], colour)
        cv2.fillPoly(image, [np.array(leg, np.int32)], colour)


@needs_hog
def test_hog_finds_a_drawn_upright_person_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    noise = np.clip(200 + rng.normal(0, 6, (256, 192, 3)), 0, 255).astype(np.uint8)
    image = noise.copy()
    _draw_person(image, cx=96, top=64, height=140)
    head = np.array([96.0, 64 + 0.55 * 140 / 8])
    detector = HogPeopleDetector()
    count, density, points = detector(image)
    assert count == 1.0 and points.shape == (1, 2)
    assert np.hypot(*(points[0] - head)) < 16  # within a head's size of the drawn head
    assert density.shape == (256, 192) and density.sum() == pytest.approx(1.0, rel=1e-5)
    assert detector(noise)[0] == 0.0
    # images smaller than the 64 x 128 window give no detections rather than an error
    count, density, points = detector(noise[:100, :60])
    assert count == 0.0 and points.shape == (0, 2) and density.sum() == 0.0


def test_hog_head_points_and_settings():
    detector = HogPeopleDetector(head_offset=0.125)
    pts = detector.head_points(np.array([[10, 20, 64, 128], [-5, -40, 30, 60.0]]), (100, 50))
    np.testing.assert_allclose(pts[0], [42.0, 36.0])  # top centre + 128 / 8
    assert 0 <= pts[1, 0] < 50 and pts[1, 1] == 0.0  # moved inside the image
    pts = detector.head_points(np.array([[30, 90, 64, 128.0]]), (100, 50))
    assert pts[0, 0] < 50 and pts[0, 1] < 100
    assert detector.settings()["head_offset"] == 0.125
    with pytest.raises(ValueError):
        HogPeopleDetector(scale=1.0)


@needs_hog
@pytest.mark.dataset
def test_hog_on_a_real_part_b_image(real_data_root):
    import time

    from helpers.data import list_records, load_example

    record = list_records("B", "test", real_data_root)[0]
    ex = load_example(record)
    t0 = time.perf_counter()
    count, density, points = HogPeopleDetector()(ex.image)
    seconds = time.perf_counter() - t0
    h, w = ex.image.shape[:2]
    assert count >= 0 and count == len(points)
    assert ((points >= 0) & (points < [w, h])).all()
    assert density.shape == (h, w) and density.sum() == pytest.approx(count, abs=1e-3)
    assert seconds < 10, f"HOG took {seconds:.1f} s on one 1024 x 768 image"


def test_published_table_has_the_entries():
    assert len(PUBLISHED_RESULTS) == 8
    table = {(r.method, r.part): (r.mae, r.mse) for r in PUBLISHED_RESULTS}
    assert table[("MCNN", "A")] == (110.2, 173.2) and table[("MCNN", "B")] == (26.4, 41.3)
    assert table[("CSRNet", "A")] == (68.2, 115.0) and table[("CSRNet", "B")] == (10.6, 16.0)
    assert table[("DM-Count", "A")] == (59.7, 95.7) and table[("DM-Count", "B")] == (7.4, 11.8)
    assert table[("P2PNet", "A")] == (52.74, 85.06) and table[("P2PNet", "B")] == (6.25, 9.9)
    assert all(r.mse > r.mae for r in PUBLISHED_RESULTS)  # RMSE >= MAE always
    assert [r.method for r in published("b")] == ["MCNN", "CSRNet", "DM-Count", "P2PNet"]
    rows = published_summaries("A")
    assert rows["CSRNet (CVPR 2018), published"]["rmse"] == 115.0
    assert all(v["published"] and "20" in v["reference"] for v in rows.values())
