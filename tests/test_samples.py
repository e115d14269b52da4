"""CrowdDataset: counts survive crop, flip, padding, rescaling and downsampling; determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.data import ImageRecord, list_records, load_example, take_evenly
from helpers.density import DensityParams, density_map, downsample_density
from helpers.models import IMAGENET_MEAN, IMAGENET_STD
from helpers.samples import CrowdDataset, collate_points, resample_density, sample_rng
from helpers.tools.folders import records_in_folder
from helpers.tools.loading import ResumableSampler, make_loader

STRIDE = 8
MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def _write_image(folder: Path, name: str, shape: tuple[int, int], n: int, rng) -> ImageRecord:
    """A random JPEG of ``shape`` with ``n`` head points in a .csv next to it."""
    h, w = shape
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(folder / f"{name}.jpg", quality=95)
    pts = np.column_stack([rng.uniform(0, w, n), rng.uniform(0, h, n)])
    # a few heads on the borders, where kernels are cut and renormalised
    pts[:2] = [[0.2, 0.3], [w - 0.1, h - 0.4]]
    np.savetxt(folder / f"{name}.csv", pts, delimiter=",", header="x,y", comments="")
    return ImageRecord(name, folder / f"{name}.jpg", folder / f"{name}.csv")


@pytest.fixture()
def records(tmp_path, monkeypatch) -> list[ImageRecord]:
    monkeypatch.setenv("CROWD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CROWD_HOME", str(tmp_path / "home"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(7)
    # odd sizes (not multiples of 8), one smaller than the crop, one larger
    for i, (shape, n) in enumerate([((75, 101), 40), ((130, 170), 90), ((40, 52), 12)]):
        _write_image(folder, f"img{i}", shape, n, rng)
    recs = records_in_folder(folder)
    assert [r.name for r in recs] == ["img0", "img1", "img2"] and all(r.points_path for r in recs)
    return recs


def _independent_density(record: ImageRecord) -> tuple[np.ndarray, int]:
    ex = load_example(record)
    return density_map(ex.points, ex.image.shape[:2], DensityParams()), ex.count


def _expected_target(full: np.ndarray, plan, crop: int) -> np.ndarray:
    """Crop, flip, pad bottom/right with zeros, sum-pool: computed here without the dataset's code."""
    region = np.zeros((crop, crop), dtype=np.float64)
    cut = full[plan.top : plan.top + crop, plan.left : plan.left + crop]
    if plan.flip:
        cut = cut[:, ::-1]
    region[: cut.shape[0], : cut.shape[1]] = cut
    return region.reshape(crop // STRIDE, STRIDE, crop // STRIDE, STRIDE).sum(axis=(1, 3))


def _close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(b))


def test_train_crop_target_equals_sliced_density(records):
    crop = 64
    ds = CrowdDataset(records, "train", crop=crop, seed=3)
    for i, rec in enumerate(records):
        full, _ = _independent_density(rec)
        for epoch in range(4):
            image, target = ds[(epoch, i)]
            plan = ds.plan(i, epoch)
            assert image.shape == (3, crop, crop) and image.dtype == torch.float32
            assert target.shape == (1, crop // STRIDE, crop // STRIDE) and target.dtype == torch.float32
            expected = _expected_target(full, plan, crop)
            # sum of the crop, 1e-4 relative: the count inside the sample is exact
            assert _close(float(target.sum()), float(expected.sum())), (i, epoch, plan)
            np.testing.assert_allclose(target[0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_padding_of_small_images(records):
    crop = 64
    ds = CrowdDataset(records, "train", crop=crop, flip=False)
    image, target = ds[(0, 2)]  # img2 is 40 x 52, smaller than the crop
    full, count = _independent_density(records[2])
    assert ds.plan(2, 0).top == 0 and ds.plan(2, 0).left == 0
    # padding = ImageNet mean colour = exactly 0 after normalisation, and no people there
    assert float(image[:, 40:, :].abs().max()) == 0.0 and float(image[:, :, 52:].abs().max()) == 0.0
    assert float(target[0, 5:, :].sum()) == 0.0 and float(target[0, :, 7:].sum()) == 0.0
    assert _close(float(target.sum()), count), (float(target.sum()), count)
    # the unpadded part is the normalised image itself
    raw = load_example(records[2]).image.transpose(2, 0, 1).astype(np.float32) / 255.0
    np.testing.assert_allclose(image[:, :40, :52].numpy(), (raw - MEAN) / STD, atol=1e-5)


def test_flip_flips_image_and_target(records):
    crop = 64
    flipped = CrowdDataset(records, "train", crop=crop, flip=True, seed=1)
    plain = CrowdDataset(records, "train", crop=crop, flip=False, seed=1)
    seen = set()
    for epoch in range(12):
        plan = flipped.plan(1, epoch)
        img_f, tgt_f = flipped[(epoch, 1)]
        img_p, tgt_p = plain[(epoch, 1)]
        assert plain.plan(1, epoch).top == plan.top and plain.plan(1, epoch).left == plan.left
        if plan.flip:
            assert torch.equal(img_f, torch.flip(img_p, dims=[2]))
            assert torch.equal(tgt_f, torch.flip(tgt_p, dims=[2]))
        else:
            assert torch.equal(img_f, img_p) and torch.equal(tgt_f, tgt_p)
        seen.add(plan.flip)
    assert seen == {True, False}, "12 epochs should show both flipped and unflipped samples"


def test_eval_mode_whole_images_exact_count(records):
    ds = CrowdDataset(records, "eval")
    for i, rec in enumerate(records):
        image, target = ds[i]
        ex = load_example(rec)
        h, w = ex.image.shape[:2]
        assert image.shape[1] % STRIDE == 0 and image.shape[2] % STRIDE == 0
        assert image.shape[1:] == (-(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE)
        assert target.shape == (1, image.shape[1] // STRIDE, image.shape[2] // STRIDE)
        assert ds.true_count(i) == ex.count == len(ex.points)
        # eval count == number of points, 1e-4 relative
        assert _close(float(target.sum()), ex.count), (float(target.sum()), ex.count)
        assert float(image[:, h:, :].abs().sum()) == 0.0 and float(image[:, :, w:].abs().sum()) == 0.0


def test_resample_density_is_mass_preserving():
    rng = np.random.default_rng(0)
    d = rng.random((75, 101)).astype(np.float32)
    total = float(d.sum(dtype=np.float64))
    for shape in [(37, 50), (75, 101), (90, 130), (20, 151), (1, 1)]:
        out = resample_density(d, shape)
        assert out.shape == shape and out.dtype == np.float32
        assert abs(float(out.sum(dtype=np.float64)) - total) <= 1e-5 * total
    # halving an even-sized map is exactly 2 x 2 sum pooling
    even = d[:74, :100]
    np.testing.assert_allclose(resample_density(even, (37, 50)), downsample_density(even, 2), rtol=1e-5)
    # and a constant density stays constant (per unit area)
    flat = np.ones((40, 60), np.float32)
    np.testing.assert_allclose(resample_density(flat, (30, 45)), 40 * 60 / (30 * 45), rtol=1e-5)


def test_random_rescale_keeps_the_count(records):
    # a crop larger than any rescaled image: the whole image is in the sample
    ds = CrowdDataset(records, "train", crop=256, rescale=(0.6, 1.4), seed=5)
    scales = []
    for i, rec in enumerate(records):
        _, count = _independent_density(rec)
        h, w = load_example(rec).image.shape[:2]
        for epoch in range(3):
            plan = ds.plan(i, epoch)
            scales.append(plan.scale)
            assert 0.6 <= plan.scale <= 1.4
            image, target = ds[(epoch, i)]
            assert _close(float(target.sum()), count), (i, epoch, float(target.sum()), count)
            # the image content ends where the rescaled image ends: padding (zeros) after it
            h2, w2 = round(h * plan.scale), round(w * plan.scale)
            assert float(image[:, h2:, :].abs().sum()) == 0.0
            assert float(image[:, : h2 - 1, w2 - 2].abs().sum()) > 0
    assert max(scales) - min(scales) > 0.2


def test_resize_half_resolution_keeps_the_count(records):
    ev = CrowdDataset(records, "eval", resize=0.5)
    tr = CrowdDataset(records, "train", resize=0.5, crop=128)
    for i, rec in enumerate(records):
        _, count = _independent_density(rec)
        h, w = load_example(rec).image.shape[:2]
        image, target = ev[i]
        h2, w2 = round(h * 0.5), round(w * 0.5)
        assert image.shape[1:] == (-(-h2 // 8) * 8, -(-w2 // 8) * 8)
        assert _close(float(target.sum()), count)
        assert _close(float(tr[(0, i)][1].sum()), count)  # crop 128 covers every half-size image


def test_grayscale_augmentation(records):
    ds = CrowdDataset(records, "train", crop=64, gray_prob=1.0)
    image, _ = ds[(0, 1)]
    rgb = image.numpy() * STD + MEAN
    np.testing.assert_allclose(rgb[0], rgb[1], atol=1e-5)
    np.testing.assert_allclose(rgb[1], rgb[2], atol=1e-5)
    never = CrowdDataset(records, "train", crop=64, gray_prob=0.0)
    assert not any(never.plan(1, e).gray for e in range(10))


def test_augmentation_is_a_function_of_seed_epoch_index(records):
    a = CrowdDataset(records, "train", crop=32, rescale=(0.8, 1.2), gray_prob=0.5, seed=11)
    b = CrowdDataset(records, "train", crop=32, rescale=(0.8, 1.2), gray_prob=0.5, seed=11)
    # b is visited in another order with other samples in between: no effect
    for key in [(2, 1), (0, 0), (1, 1)]:
        b[(5, 2)]
        xa, ya = a[key]
        xb, yb = b[key]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.plan(1, 0) == b.plan(1, 0)
    plans = {a.plan(1, e) for e in range(8)}
    assert len(plans) == 8, "different epochs give different augmentations"
    other_seed = CrowdDataset(records, "train", crop=32, rescale=(0.8, 1.2), gray_prob=0.5, seed=12)
    assert other_seed.plan(1, 0) != a.plan(1, 0)
    # ds.epoch is used for integer keys
    a.epoch = 2
    assert torch.equal(a[1][0], a[(2, 1)][0])
    r1, r2 = sample_rng(1, 2, 3).random(4), sample_rng(1, 2, 3).random(4)
    assert np.array_equal(r1, r2)


def test_in_memory_cache_gives_identical_samples(records):
    plain = CrowdDataset(records, "train", crop=64, rescale=(0.8, 1.2), seed=2)
    cached = CrowdDataset(records, "train", crop=64, rescale=(0.8, 1.2), seed=2, cache_in_memory=True)
    assert cached.memory_bytes() == 0
    cached.preload(progress=False)
    expected = 0
    for rec in records:
        h, w = load_example(rec).image.shape[:2]
        expected += h * w * 3 + h * w * 4 + load_example(rec).count * 16  # uint8 image, float32 density, points
    assert cached.memory_bytes() == expected
    for epoch in range(2):
        for i in range(len(records)):
            x1, y1 = plain[(epoch, i)]
            x2, y2 = cached[(epoch, i)]
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_sampler_order_skip_and_ranks(records):
    ds = CrowdDataset(records * 3, "train", crop=32)  # 9 samples
    s = ResumableSampler(ds, shuffle=True, seed=4)
    s.set_epoch(2)
    full = list(s)
    assert sorted(i for _, i in full) == list(range(9)) and all(e == 2 for e, _ in full)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:] and len(s) == 5
    s.set_epoch(3)
    assert list(s) != full, "each epoch has its own order"
    r0 = ResumableSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=4)
    r1 = ResumableSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=4)
    r0.set_epoch(2)
    r1.set_epoch(2)
    both = [i for _, i in r0] + [i for _, i in r1]
    assert len(both) == 10 and set(both) == set(range(9))  # padded to a multiple of 2 ranks


def test_loader_with_workers_matches_single_process(records):
    ds = CrowdDataset(records * 2, "train", crop=32, rescale=(0.8, 1.2), seed=9)
    batches = {}
    for workers in (0, 1):
        loader = make_loader(ds, batch_size=2, shuffle=True, seed=9, workers=workers)
        loader.sampler.set_epoch(1)
        batches[workers] = [(x.clone(), y.clone()) for x, y in loader]
    assert len(batches[0]) == 3
    for (x0, y0), (x1, y1) in zip(batches[0], batches[1], strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def _expected_points(record: ImageRecord, resize: float, plan, crop: int) -> np.ndarray:
    """The heads of a training sample, computed here: resize and rescale (each axis by its exact
    size ratio), shift by the crop corner, keep those inside the crop's image pixels, flip x."""
    ex = load_example(record)
    h, w = ex.image.shape[:2]
    pts = ex.points.astype(np.float64)
    for factor in (resize, plan.scale):
        h2, w2 = max(1, round(h * factor)), max(1, round(w * factor))
        pts = pts * [w2 / w, h2 / h]
        h, w = h2, w2
    hc, wc = min(crop, h - plan.top), min(crop, w - plan.left)
    pts = pts - [plan.left, plan.top]
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < wc) & (pts[:, 1] >= 0) & (pts[:, 1] < hc)]
    if plan.flip:
        pts[:, 0] = wc - pts[:, 0]
    return pts


@pytest.mark.parametrize("resize", [1.0, 0.75])
def test_point_targets_follow_crops_flips_and_rescaling(records, resize):
    crop = 48
    kw = {"crop": crop, "rescale": (0.7, 1.3), "flip": True, "seed": 4, "resize": resize}
    points = CrowdDataset(records, "train", targets="points", **kw)
    dens = CrowdDataset(records, "train", **kw)
    flips = set()
    for i, rec in enumerate(records):
        for epoch in range(6):
            plan = points.plan(i, epoch)
            assert plan == dens.plan(i, epoch)
            image, pts = points[(epoch, i)]
            assert pts.dtype == torch.float32 and pts.ndim == 2 and pts.shape[1] == 2
            assert torch.equal(image, dens[(epoch, i)][0])  # the same pixels as the density sample
            want = _expected_points(rec, resize, plan, crop)
            order = np.lexsort(want.T)
            got = pts.numpy()[np.lexsort(pts.numpy().T)]
            np.testing.assert_allclose(got, want[order], rtol=0, atol=1e-4)  # float32 of <= 64 px
            flips.add(plan.flip)
            # the density target has the same heads, up to kernel mass cut at the crop border
            # (a head inside keeps >= ~half of its kernel, one outside gives < half)
            target = float(dens[(epoch, i)][1].sum())
            assert abs(target - len(want)) <= 0.5 * max(1, len(want)) + 2, (i, epoch, target, len(want))
    assert flips == {True, False}


def test_point_targets_in_eval_mode_and_batches(records):
    ds = CrowdDataset(records, "eval", targets="points", resize=0.5)
    for i, rec in enumerate(records):
        ex = load_example(rec)
        h, w = ex.image.shape[:2]
        h2, w2 = round(h * 0.5), round(w * 0.5)
        image, pts = ds[i]
        assert image.shape[1:] == (-(-h2 // 8) * 8, -(-w2 // 8) * 8) and len(pts) == ds.true_count(i)
        np.testing.assert_allclose(pts.numpy(), ex.points * [w2 / w, h2 / h], rtol=1e-6)
    train = CrowdDataset(records * 2, "train", crop=32, targets="points", seed=1)
    images, points = collate_points([train[(0, 0)], train[(0, 1)]])
    assert images.shape == (2, 3, 32, 32) and [len(p) for p in points] == [len(train[(0, k)][1]) for k in (0, 1)]
    loader = make_loader(train, batch_size=2, shuffle=True, seed=1)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 3 and all(isinstance(p, list) and len(p) == 2 for _, p in batches)
    assert train.memory_bytes() == 0 and CrowdDataset(records, "train", targets="points",
                                                      cache_in_memory=True)._load_base(0).density is None


def test_bad_arguments(records):
    with pytest.raises(ValueError, match="multiple of the stride"):
        CrowdDataset(records, "train", crop=30)
    with pytest.raises(ValueError, match="mode"):
        CrowdDataset(records, "test")
    with pytest.raises(ValueError, match="rescale"):
        CrowdDataset(records, "train", rescale=(1.2, 0.8))
    with pytest.raises(ValueError, match="targets"):
        CrowdDataset(records, "train", targets="boxes")


@pytest.mark.dataset
def test_real_part_b_counts(real_data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CROWD_CACHE", str(tmp_path / "cache"))
    recs = take_evenly(list_records("B", "train", real_data_root), 2)
    crop = 256
    ds = CrowdDataset(recs, "train", crop=crop, seed=0)
    ev = CrowdDataset(recs, "eval")
    for i, rec in enumerate(recs):
        full, count = _independent_density(rec)
        for epoch in range(2):
            _, target = ds[(epoch, i)]
            expected = _expected_target(full, ds.plan(i, epoch), crop)
            assert _close(float(target.sum()), float(expected.sum())), (rec.name, epoch)
        image, target = ev[i]
        assert image.shape == (3, 768, 1024) and target.shape == (1, 96, 128)
        assert _close(float(target.sum()), count) and ev.true_count(i) == count
