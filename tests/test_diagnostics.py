"""Layer shapes and cost, the overfit check, batch-norm modes, measured receptive fields, predictions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers.analysis import diagnostics as insp
from helpers.models import HeatmapCNN, count_parameters, receptive_field
from helpers.samples import CrowdDataset, normalize_image
from helpers.tools.folders import records_in_folder


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return HeatmapCNN(width=8)


def state_copy(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ layer shapes


def test_layer_shapes_of_heatmap_cnn(model):
    before = state_copy(model)
    rows = insp.layer_shapes(model, (2, 3, 40, 56))
    assert model.training and same_state(before, state_copy(model))  # mode and BN statistics kept
    names = [r.name for r in rows]
    assert names[0] == "input" and names[-1] == "output" and "body.conv1" in names and "head" in names
    by_name = {r.name: r for r in rows}
    assert by_name["body.conv1"].shape == (2, 4, 40, 56) and by_name["body.conv1"].stride == 1
    assert by_name["body.pool3"].shape == (2, 16, 5, 7) and by_name["body.pool3"].stride == 8
    assert rows[-1].shape == (2, 1, 5, 7)
    # MACs per image: output pixels x C_out x C_in x 3 x 3, computed by hand
    assert by_name["body.conv1"].macs == 40 * 56 * 4 * 3 * 9
    assert by_name["body.dconv4_2"].macs == 5 * 7 * 32 * 32 * 9
    assert by_name["head"].macs == 5 * 7 * 1 * 16
    assert by_name["body.bn1"].macs == 0 and by_name["body.bn1"].params == 2 * 4
    assert sum(r.params for r in rows) == count_parameters(model)


def test_layer_shapes_with_containers_and_a_tensor(model):
    x = torch.randn(1, 3, 16, 16)
    rows = insp.layer_shapes(model, x, leaves_only=False)
    assert "body" in [r.name for r in rows]
    assert next(r for r in rows if r.name == "body").shape == (1, 16, 2, 2)
    with pytest.raises(ValueError):
        insp.layer_shapes(model, (3, 16, 16))
    text = insp.format_layer_shapes(insp.layer_shapes(model, x))
    assert text.splitlines()[0].startswith("layer") and text.splitlines()[-1].startswith("total")


# ------------------------------------------------------------------ overfit one batch


def blob_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32 x 32 images and targets (people per 8 x 8 cell) with a few heads each."""
    rng = np.random.default_rng(3)
    images = torch.tensor(rng.normal(size=(2, 3, 32, 32)), dtype=torch.float32)
    targets = torch.zeros(2, 1, 4, 4)
    targets[0, 0, 1, 1], targets[0, 0, 2, 3], targets[1, 0, 0, 2] = 0.8, 0.5, 1.0
    return images, targets


def test_overfit_batch_first_loss_and_fit(model):
    images, targets = blob_batch()
    reference = copy.deepcopy(model).train()
    expected_first = F.mse_loss(reference(images), 100.0 * targets).item()
    losses = insp.overfit_batch(model, images, targets, steps=50, lr=3e-2, scale=100.0, progress=False)
    assert len(losses) == 50 and np.isfinite(losses).all()
    assert losses[0] == pytest.approx(expected_first, rel=1e-5)
    assert losses[-1] < losses[0] / 10  # 100x to 400x here
    assert model.training


def test_overfit_batch_rejects_bad_settings(model):
    images, targets = blob_batch()
    with pytest.raises(ValueError):
        insp.overfit_batch(model, images, targets, steps=0, lr=1e-3)
    with pytest.raises(ValueError):
        insp.overfit_batch(model, images, targets, steps=1, lr=0.0)


# ------------------------------------------------------------------ batch norm


def test_batch_dependence(model):
    images, targets = blob_batch()
    insp.overfit_batch(model, images, targets, steps=5, lr=1e-2, progress=False)  # non-trivial BN stats
    before = state_copy(model)
    dep = insp.batch_dependence(model, images, scale=100.0)
    assert same_state(before, state_copy(model))  # worked on a copy
    assert dep["eval_alone"] == pytest.approx(dep["eval_in_batch"], rel=1e-5)
    assert abs(dep["train_alone"] - dep["train_in_batch"]) > 1e-3
    model.eval()
    with torch.no_grad():
        assert dep["eval_alone"] == pytest.approx(float(model(images[:1]).sum()) / 100.0, rel=1e-5)
    with pytest.raises(ValueError):
        insp.batch_dependence(model, images[:1])


# ------------------------------------------------------------------ receptive field, measured


def test_receptive_field_box_and_gradient(model):
    rows = receptive_field(model)
    # output (16, 16): centre 3.5 + 16 * 8 = 131.5, half-width (162 - 1) / 2 = 80.5 -> 51 .. 212
    assert insp.receptive_field_box(rows, (16, 16)) == (51, 51, 212, 212)
    assert insp.receptive_field_box(rows, (0, 2)) == (-61, -77, 100, 84)
    x = torch.randn(1, 3, 256, 256)
    grad = insp.input_gradient(model, x, (16, 16))
    assert grad.shape == (256, 256) and model.training
    ys, xs = np.nonzero(grad)
    assert xs.min() >= 51 and xs.max() <= 212 and ys.min() >= 51 and ys.max() <= 212
    assert xs.max() - xs.min() > 100  # not trivially small
    with pytest.raises(ValueError):
        insp.input_gradient(model, x, (32, 0))
    with pytest.raises(ValueError):
        insp.input_gradient(model, torch.randn(2, 3, 64, 64), (0, 0))


# ------------------------------------------------------------------ predictions


def test_denormalize_inverts_normalize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    back = insp.denormalize_image(torch.from_numpy(normalize_image(image)))
    assert back.dtype == np.uint8 and back.shape == image.shape
    np.testing.assert_array_equal(back, image)


@pytest.fixture()
def eval_set(tmp_path, monkeypatch) -> CrowdDataset:
    """Two small images (one not a multiple of 8) with CSV points, as an eval-mode dataset."""
    monkeypatch.setenv("CROWD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CROWD_HOME", str(tmp_path / "home"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name, (h, w), n in [("img1", (44, 61), 7), ("img2", (32, 40), 3)]:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        pts = np.column_stack([rng.uniform(2, w - 2, n), rng.uniform(2, h - 2, n)])
        np.savetxt(folder / f"{name}.csv", pts, delimiter=",", header="x,y", comments="")
    return CrowdDataset(records_in_folder(folder), "eval")


def test_predict_samples(model, eval_set):
    samples = insp.predict_samples(model, eval_set, [0, 1], scale=100.0)
    s = samples[0]
    assert s.name == "img1" and s.image.shape == (44, 61, 3) and s.stride == 8
    assert s.true.shape == s.pred.shape == (6, 8)  # ceil(44/8) x ceil(61/8)
    assert s.true_count == 7 and s.true.sum() == pytest.approx(7, rel=1e-4)
    # the prediction is the eval-mode output of the padded image, divided by the scale
    image, _ = eval_set[0]
    model.eval()
    with torch.no_grad():
        direct = model(image[None])[0, 0].numpy() / 100.0
    np.testing.assert_allclose(s.pred, direct[:6, :8], rtol=1e-5)
    assert s.pred_count == pytest.approx(float(direct.sum()), rel=1e-5)
    assert samples[1].true.shape == (4, 5) and samples[1].true_count == 3
    train_set = CrowdDataset(eval_set.records, "train", crop=16)
    with pytest.raises(ValueError):
        insp.predict_samples(model, train_set, [0], scale=100.0)
