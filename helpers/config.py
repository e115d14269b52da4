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


_QUICK_SET_HERE: list[str] = []  # the CROWD_QUICK value use_settings wrote (not the environment's)


def use_settings(quick: bool = True) -> bool:
    """A notebook's settings cell: quick mode for the helpers, unless the environment chose it.

    Inputs:
    - quick: bool, the notebook's ``QUICK``; it sets CROWD_QUICK, except when CROWD_QUICK came
      from outside the notebook (``make run CROWD_QUICK=0``, CI), which wins
    Returns:
    - quick: bool, the mode in force (printed too)
    """
    env = os.environ.get("CROWD_QUICK")
    if env is None or env in _QUICK_SET_HERE:
        os.environ["CROWD_QUICK"] = "1" if quick else "0"
        _QUICK_SET_HERE[:] = [os.environ["CROWD_QUICK"]]
        why = f"QUICK = {bool(quick)} in this notebook"
    else:
        why = f"CROWD_QUICK={env} set outside the notebook wins over QUICK = {bool(quick)}"
    mode = "ON: small subsets, minutes" if quick_mode() else "OFF: the full recipe, can take long"
    print(f"quick mode {mode} ({why})")
    return quick_mode()


def user_path(text: str | os.PathLike[str]) -> Path | None:
    """A path as a person types or pastes it (settings, path boxes).

    Inputs:
    - text: str or path; surrounding spaces and quotes are dropped (Windows "Copy as path" gives
      "C:\\...\\photo.jpg" in quotes) and a leading ~ is expanded
    Returns:
    - path: Path (not resolved, may not exist), or None when the text is blank
    """
    text = str(text).strip().strip("\"'").strip()
    return Path(text).expanduser() if text else None


def project_root() -> Path:
    """The project folder. Returns: absolute Path: CROWD_HOME, else this checkout, else the cwd."""
    env = user_path(os.environ.get("CROWD_HOME", ""))
    if env:
        return env.resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "helpers").is_dir():
        return checkout
    return Path.cwd().resolve()


def env_data_root() -> Path | None:
    """The dataset root named by CROWD_DATA. Returns: absolute Path, or None when unset."""
    env = user_path(os.environ.get("CROWD_DATA", ""))
    return env.resolve() if env else None


def default_data_root() -> Path:
    """Where the README unpacks ShanghaiTech. Returns: Path data/ShanghaiTech (may not exist)."""
    return project_root() / "data" / "ShanghaiTech"


def synthetic_root() -> Path:
    """The synthetic set (made by ``crowd synth``). Returns: Path data/synthetic (may not exist)."""
    return project_root() / "data" / "synthetic"


def cache_root() -> Path:
    """Root for caches (density maps). Returns: Path, CROWD_CACHE or build/cache in the project."""
    env = user_path(os.environ.get("CROWD_CACHE", ""))
    return env.resolve() if env else project_root() / "build" / "cache"


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
