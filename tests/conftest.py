"""Shared fixtures. Tests that need the real ShanghaiTech dataset use ``real_data_root``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def write_tiny_shtech(root: Path, n_images: int = 12, seed: int = 0, part: str = "B", split: str = "train") -> Path:
    """Noisy 96 x 128 JPEGs with 3-30 dark 'heads' each, ShanghaiTech layout (part B train)."""
    import numpy as np
    from PIL import Image

    from helpers.tools.synth import write_points_mat

    rng = np.random.default_rng(seed)
    images = root / f"part_{part}" / f"{split}_data" / "images"
    gts = root / f"part_{part}" / f"{split}_data" / "ground-truth"
    images.mkdir(parents=True)
    gts.mkdir(parents=True)
    h, w = 96, 128
    for i in range(1, n_images + 1):
        k = int(rng.integers(3, 30))
        pts = np.column_stack([rng.uniform(0, w, k), rng.uniform(0, h, k)])
        img = (rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
        for x, y in pts:
            img[max(0, int(y) - 2) : int(y) + 3, max(0, int(x) - 2) : int(x) + 3] = 20
        Image.fromarray(img).save(images / f"IMG_{i}.jpg", quality=90)
        write_points_mat(gts / f"GT_IMG_{i}.mat", pts)
    return root


@pytest.fixture()
def one_thread():
    """Run the test with one torch CPU thread (like subprocesses with OMP_NUM_THREADS=1): tiny
    models run fastest that way on a shared machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_shtech(tmp_path_factory) -> Path:
    """12 tiny images (fit 11, val 1) for training tests; shared by the session, never modified."""
    return write_tiny_shtech(tmp_path_factory.mktemp("tiny_shtech"))


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real ShanghaiTech root from ``CROWD_DATA``; skips the test with the reason otherwise."""
    env = os.environ.get("CROWD_DATA", "").strip()
    if not env:
        pytest.skip("real dataset not configured: set CROWD_DATA to the ShanghaiTech root")
    root = Path(env).expanduser()
    if not (root / "part_A").is_dir() and not (root / "part_A_final").is_dir():
        pytest.skip(f"real dataset not found: CROWD_DATA={env} has no part_A folder")
    return root.resolve()


@pytest.fixture()
def tiny_training_env(tiny_shtech, tmp_path, monkeypatch, one_thread) -> Path:
    """Train on ``tiny_shtech`` in full mode with one torch thread; CROWD_HOME is ``tmp_path/home``
    and CROWD_CACHE ``tmp_path/cache``. Returns the dataset root."""
    monkeypatch.setenv("CROWD_DATA", str(tiny_shtech))
    monkeypatch.setenv("CROWD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CROWD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CROWD_QUICK", raising=False)
    return tiny_shtech


@pytest.fixture()
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Point CROWD_HOME and CROWD_CACHE at a temporary project folder, with no dataset configured."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CROWD_HOME", str(home))
    monkeypatch.setenv("CROWD_CACHE", str(home / "build" / "cache"))
    monkeypatch.delenv("CROWD_DATA", raising=False)
    return home


@pytest.fixture()
def figures(tmp_path, monkeypatch):
    """CROWD_HOME in a temporary folder; yields where figures must appear. Closes all figures."""
    import matplotlib.pyplot as plt

    monkeypatch.setenv("CROWD_HOME", str(tmp_path))
    yield tmp_path / "report" / "figures"
    plt.close("all")
