"""Where things are, quick mode, and device choice: the series' few settings, in one place.

Every setting is read from the environment when asked for (never at import time):

=================  ==========================================================================
``CROWD_DATA``     ShanghaiTech root (the folder holding ``part_A`` and ``part_B``).
                   Unset: ``data/ShanghaiTech`` in the project, else the synthetic set.
``CROWD_QUICK``    ``1`` shrinks data and iterations so the series runs in minutes on a CPU.
``CROWD_HOME``     The project folder (``runs/``, ``report/``, ``build/``). Unset: this checkout.
``CROWD_CACHE``    Where density-map caches go. Unset: ``build/cache`` in the project.
``CROWD_DEVICE``   Force a device (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
=================  ==========================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.errors import CrowdError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


def quick_mode() -> bool:
    """Whether quick mode is on. Returns: bool, True when CROWD_QUICK is 1/true/yes/on."""
    return os.environ.get("CROWD_QUICK", "0").strip().lower() in {"1", "true", "yes", "on"}


def quick_or_full(quick: int | float, full: int | float) -> int | float:
    """Pick a size or an iteration count by mode.

    Inputs:
    - quick, full: int or float, the values for quick and full mode
    Returns:
    - value: ``quick`` in quick mode, ``full`` otherwise
    """
    return quick if quick_mode() else full


def project_root() -> Path:
    """The project folder. Returns: absolute Path: CROWD_HOME, else this checkout, else the cwd."""
    env = os.environ.get("CROWD_HOME")
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "helpers").is_dir():
        return checkout
    return Path.cwd().resolve()


def env_data_root() -> Path | None:
    """The dataset root named by CROWD_DATA. Returns: absolute Path, or None when unset."""
    env = os.environ.get("CROWD_DATA", "").strip()
    return Path(env).expanduser().resolve() if env else None


def default_data_root() -> Path:
    """Where the README unpacks ShanghaiTech. Returns: Path data/ShanghaiTech (may not exist)."""
    return project_root() / "data" / "ShanghaiTech"


def synthetic_root() -> Path:
    """The synthetic set (made by ``crowd synth``). Returns: Path data/synthetic (may not exist)."""
    return project_root() / "data" / "synthetic"


def cache_root() -> Path:
    """Root for caches (density maps). Returns: Path, CROWD_CACHE or build/cache in the project."""
    env = os.environ.get("CROWD_CACHE", "").strip()
    return Path(env).expanduser().resolve() if env else project_root() / "build" / "cache"


def runs_root() -> Path:
    """Where training runs go. Returns: Path runs/ in the project."""
    return project_root() / "runs"


def figures_dir() -> Path:
    """Where report figures go. Returns: Path report/figures/ in the project (created)."""
    path = project_root() / "report" / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def report_dir() -> Path:
    """Where report tables and the report go. Returns: Path report/ in the project (created)."""
    path = project_root() / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(preference: str | None = None) -> torch.device:
    """Choose the compute device.

    Inputs:
    - preference: str such as "cpu" or "cuda:1", or None
    Returns:
    - device: torch.device: ``preference``, else CROWD_DEVICE, else CUDA, MPS, CPU
    """
    import torch

    wanted = preference or os.environ.get("CROWD_DEVICE", "").strip() or None
    if wanted:
        device = torch.device(wanted)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CrowdError(f"Device {wanted!r} was requested but CUDA is not available here. "
                             "Use --device cpu, or unset CROWD_DEVICE to choose automatically.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
