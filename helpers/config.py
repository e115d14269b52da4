"""Where things are, quick mode, and device choice: the series' few settings, in one place.

Every setting is read from the environment when asked for (never at import time), so a notebook
can change ``os.environ`` and call again.

=================  ==========================================================================
``CROWD_DATA``     ShanghaiTech root (the folder holding ``part_A`` and ``part_B``).
                   Unset: ``data/ShanghaiTech`` in the project, else the synthetic set.
``CROWD_QUICK``    ``1`` shrinks data and iterations so the series runs in minutes on a CPU.
``CROWD_HOME``     The project folder (where ``runs/``, ``report/`` and ``build/`` live).
                   Unset: the checkout this package was installed from, else the current folder.
``CROWD_CACHE``    Where density-map caches go. Unset: ``build/cache`` in the project.
``CROWD_DEVICE``   Force a device (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
=================  ==========================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

_TRUE = {"1", "true", "yes", "on"}


def quick_mode() -> bool:
    """True when ``CROWD_QUICK`` is set to 1/true/yes: small data, few iterations."""
    return os.environ.get("CROWD_QUICK", "0").strip().lower() in _TRUE


def quick_or_full(quick: int | float, full: int | float) -> int | float:
    """Pick a size or an iteration count: ``quick`` in quick mode, ``full`` otherwise."""
    return quick if quick_mode() else full


def project_root() -> Path:
    """The project folder: ``CROWD_HOME``, else this checkout, else the current folder."""
    env = os.environ.get("CROWD_HOME")
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "helpers").is_dir():
        return checkout
    return Path.cwd().resolve()


def env_data_root() -> Path | None:
    """The dataset root named by ``CROWD_DATA``, or None when it is unset."""
    env = os.environ.get("CROWD_DATA", "").strip()
    return Path(env).expanduser().resolve() if env else None


def default_data_root() -> Path:
    """Where the README tells students to unpack ShanghaiTech: ``data/ShanghaiTech``."""
    return project_root() / "data" / "ShanghaiTech"


def synthetic_root() -> Path:
    """Where the generated synthetic crowd set lives (gitignored, rebuilt on demand)."""
    return project_root() / "data" / "synthetic"


def cache_root() -> Path:
    """Root for caches (density maps): ``CROWD_CACHE`` or ``build/cache``."""
    env = os.environ.get("CROWD_CACHE", "").strip()
    return Path(env).expanduser().resolve() if env else project_root() / "build" / "cache"


def runs_root() -> Path:
    """Training runs (checkpoints, histories): ``runs/`` in the project."""
    return project_root() / "runs"


def figures_dir() -> Path:
    """Report figures: ``report/figures/`` in the project (created on first use)."""
    path = project_root() / "report" / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def report_dir() -> Path:
    """Report tables and the assembled report: ``report/`` in the project."""
    path = project_root() / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(preference: str | None = None) -> torch.device:
    """Choose the compute device: ``preference``, else ``CROWD_DEVICE``, else CUDA, MPS, CPU."""
    import torch

    wanted = preference or os.environ.get("CROWD_DEVICE", "").strip() or None
    if wanted:
        device = torch.device(wanted)
        if device.type == "cuda" and not torch.cuda.is_available():
            from helpers.errors import CrowdError

            raise CrowdError(
                f"Device {wanted!r} was requested but CUDA is not available here. "
                "Use --device cpu, or unset CROWD_DEVICE to choose automatically."
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
