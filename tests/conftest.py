"""Shared fixtures. Tests that need the real ShanghaiTech dataset use ``real_data_root``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Point CROWD_HOME and CROWD_CACHE at a temporary project folder, with no dataset configured."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CROWD_HOME", str(home))
    monkeypatch.setenv("CROWD_CACHE", str(home / "build" / "cache"))
    monkeypatch.delenv("CROWD_DATA", raising=False)
    return home
