"""Saving and loading checkpoints safely, and rebuilding a trained model for inference.

A checkpoint is a ``dict`` written with ``torch.save`` to a temporary file and renamed over the
target (:func:`helpers.tools.fileio.atomic_path`): a crash or a kill during the write leaves the previous
file intact, never a truncated one.

Reading always uses ``torch.load(..., weights_only=True)``. A ``.pt`` file is a pickle, and
unpickling an arbitrary file can run arbitrary code; ``weights_only`` only rebuilds tensors and
plain Python data (dicts, lists, numbers, strings), so a file containing pickled code is refused.
That is why the training loop stores everything (random-number-generator states included) as
tensors and plain types.

Every checkpoint carries a ``checksum`` of its contents (:func:`content_checksum`: sha256 over
each tensor's dtype, shape and bytes and every other value, in sorted key order), written by
:func:`save_checkpoint` and verified by :func:`load_checkpoint` on every load: a file damaged by a
bad disk or an interrupted copy (Drive sync) is refused by name (:class:`CheckpointDamagedError`)
instead of giving absurd counts. Files written before checksums existed load with one note.
Hashing costs about 40 ms per 65 MB (a CSRNet state dict) on a CPU with SHA instructions.

The training loop (:mod:`helpers.tools.trainer`) writes these keys; :func:`load_model` needs the first
three::

    model         state dict of the network (without a DistributedDataParallel "module." prefix)
    model_name    "heatmap_cnn" or "csrnet" (helpers.models.build_model)
    model_kwargs  constructor arguments, e.g. {"width": 32}
    scale         density scale factor: the network predicts density x scale
    epoch, step, best_val_mae, config, ...
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.errors import CheckpointError
from helpers.tools.messages import one_line

#: Constructor arguments that only matter when a model is first created (ImageNet weights for the
#: CSRNet frontend); a checkpoint holds all weights, so they are dropped when rebuilding.
INIT_ONLY_KWARGS = ("pretrained",)
#: The key of the checksum in a checkpoint dict (``"sha256:<64 hex digits>"``).
CHECKSUM_KEY = "checksum"
_NOTED_WITHOUT_CHECKSUM: set[str] = set()


class CheckpointDamagedError(CheckpointError):
    """A checkpoint's bytes changed after it was written (checksum mismatch, truncated file)."""


def _feed(digest, value: Any) -> None:
    """Add ``value`` to the running hash ``digest``, tagged by type so that no two values collide."""
    import torch

    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{data.dtype}{tuple(value.shape)}:".encode())
        digest.update(memoryview(data.view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (bytes, bytearray)):
        digest.update(f"B{len(value)}:".encode() + bytes(value))
    elif isinstance(value, str):
        data = value.encode("utf-8")
        digest.update(f"S{len(data)}:".encode() + data)
    else:  # None, bool, int, float (repr round-trips exactly), torch.Size, dtype, device
        text = f"{type(value).__name__}={value!r}".encode()
        digest.update(f"R{len(text)}:".encode() + text)


def content_checksum(checkpoint: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of a checkpoint dict's contents, its own ``checksum`` entry excluded.

    Tensors count by dtype, shape and bytes (not by how they are stored), dict entries in sorted
    key order; so a checkpoint read back gives the checksum it was written with.
    """
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY})
    return f"sha256:{digest.hexdigest()}"


def _damage_advice(path: Path, shipped: bool = False) -> str:
    """What to do with a damaged checkpoint: the run's other checkpoint, or train again."""
    if shipped or path.parent.name == "shipped_models":
        return ("restore the file (git checkout it, or reinstall the package) or train a model "
                "of your own (notebook 03)")
    if path.name == "best.pt":
        return (f"use the run's other checkpoint ({path.parent / 'last.pt'}) if it loads, or train "
                "again (delete the run folder, or choose another --out)")
    if path.name == "last.pt":
        return (f"the run cannot be resumed; its other checkpoint ({path.parent / 'best.pt'}) still "
                "serves for counting and evaluation if it loads; train again (delete the run "
                "folder, or choose another --out)")
    return "use another checkpoint of the run (best.pt or last.pt), or train again"


def verify_checksum(path: Path, checkpoint: dict[str, Any]) -> bool:
    """Check ``checkpoint`` (read from ``path``) against its stored checksum.

    Returns True when it matches, False (after printing one note, once per file) for a file
    written before checksums existed; raises :class:`CheckpointDamagedError` on a mismatch.
    """
    stored = checkpoint.get(CHECKSUM_KEY)
    if stored is None:
        key = str(path.resolve())
        if key not in _NOTED_WITHOUT_CHECKSUM:
            _NOTED_WITHOUT_CHECKSUM.add(key)
            print(f"note: {path} has no checksum (written by an older version); it loads, but "
                  "damage to it cannot be detected. Training again writes checkpoints with one.",
                  file=sys.stderr, flush=True)
        return False
    if content_checksum(checkpoint) != stored:
        raise CheckpointDamagedError(
            f"{path} is damaged: its contents do not match the checksum written with it (a bad "
            f"disk or an interrupted copy or sync changes bytes), so it is not used: "
            f"{_damage_advice(path, shipped='shipped' in checkpoint)}."
        )
    return True


def save_checkpoint(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically with ``torch.save``; returns the path.

    A :data:`CHECKSUM_KEY` entry (:func:`content_checksum`) is added to what is written (the
    caller's dict is not changed). A failed write (disk full, no permission; torch reports a full
    disk as ``RuntimeError``) raises :class:`CheckpointError` and leaves any previous file at
    ``path`` as it was.
    """
    import torch

    from helpers.tools.fileio import atomic_path

    path = Path(path)
    checkpoint = {**checkpoint, CHECKSUM_KEY: content_checksum(checkpoint)}
    try:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(checkpoint, tmp)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"Could not write the checkpoint {path} ({one_line(exc)}); the previous file there, "
            "if any, is unchanged. Free disk space or make the folder writable (or choose "
            "another output folder), then run again."
        ) from exc
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict with ``weights_only=True`` and verify its checksum.

    Raises :class:`CheckpointError` when the file is missing, contains pickled Python objects
    other than tensors and plain data (refused: loading them could run code), or does not hold a
    dict; :class:`CheckpointDamagedError` when it is not a readable PyTorch file (truncated,
    corrupt) or its contents do not match its checksum (:func:`verify_checksum`).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Train a model first (crowd train "
            "--out ...), or check the path (a run folder holds last.pt and best.pt)."
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = _unpickling_reason(exc)
        raise CheckpointError(
            f"Refusing to load {path}: it contains pickled Python objects that are not tensors "
            f"or plain data ({first}). Unpickling such a file could run arbitrary code. Use only "
            "checkpoints written by crowd train, or re-save the weights as a plain state dict "
            "from a source you trust."
        ) from exc
    except Exception as exc:  # zip/EOF/format errors: torch raises several types
        raise CheckpointDamagedError(
            f"{path} is not a readable PyTorch checkpoint ({one_line(exc)}). The file "
            f"is probably truncated or corrupt; {_damage_advice(path)}."
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a checkpoint dict; it was not written by "
            "crowd train. Use a checkpoint from a run folder (best.pt or last.pt)."
        )
    verify_checksum(path, obj)
    return obj


def _unpickling_reason(exc: BaseException) -> str:
    """The line of torch's long ``weights_only`` message that says what was refused.

    (The rest of that message explains how to switch the protection off, which we do not want to
    repeat.)
    """
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # colour codes
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\.(?:\s|$)", text)
    if match:
        return match.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


@dataclass
class CheckpointInfo:
    """What :func:`load_model` found besides the weights.

    Divide the model's output by ``scale`` to get people per output cell (the sum is the count).
    ``scale`` is the training scale divided by the checkpoint's ``count_gain`` (1 unless the run
    used ``count_calibration``, :func:`helpers.tools.trainer.count_gain`).
    """

    path: Path
    model_name: str
    model_kwargs: dict[str, Any]
    scale: float
    epoch: int | None = None
    step: int | None = None
    best_val_mae: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def input_scale(self) -> float:
        """The image scale the model was trained at (``TrainConfig.resize``; 1.0 = full size).

        Inference must resize images by the same factor, or heads have the wrong size for it.
        """
        return float(self.config.get("resize", 1.0) or 1.0)


def strip_prefix(state: dict[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove a ``DistributedDataParallel``-style prefix from every key that has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(model, state: dict[str, Any], where: str, model_name: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys and shapes."""
    import torch

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) ({_describe(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_describe(unexpected)})")
        raise CheckpointError(
            f"{where} does not match a {model_name} network: {'; '.join(parts)}. It was probably "
            "trained with the other model (or another width); load it with the model it was "
            "trained with."
        )
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(tensor.shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(
                f"{where}: weight {key!r} has shape {got} but a {model_name} built with these "
                f"settings needs {tuple(tensor.shape)}; the checkpoint belongs to another "
                "configuration of the model. Use a checkpoint trained with these settings, or "
                "build the model with the settings the checkpoint was trained with."
            )


def load_model(
    path: str | os.PathLike[str],
    device: Any = None,
    expect_model: str | None = None,
):
    """Rebuild the trained network of a checkpoint, in eval mode on ``device``.

    Returns ``(model, info)``; ``model(x)`` gives ``density x info.scale`` for a normalised
    ``(B, 3, H, W)`` input, so divide by ``info.scale``. ``expect_model`` (``"heatmap_cnn"`` or
    ``"csrnet"``) refuses a checkpoint of the other model. ``device`` defaults to
    :func:`helpers.config.pick_device`.

    Raises :class:`CheckpointError` for unreadable files, checkpoints not written by
    :mod:`helpers.tools.trainer`, and weights that do not fit the named model (saying which keys).
    """
    import torch

    from helpers import config
    from helpers.models import MODEL_NAMES, build_model

    path = Path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    for key in ("model", "model_name"):
        if key not in ckpt:
            raise CheckpointError(
                f"{path} has no {key!r} entry: it is not a checkpoint written by crowd train "
                f"(keys found: {_describe(sorted(map(str, ckpt)))}). Use a checkpoint from a run "
                "folder (best.pt or last.pt)."
            )
    name = str(ckpt["model_name"])
    if name not in MODEL_NAMES:
        raise CheckpointError(
            f"{path} names an unknown model {name!r}; known: {', '.join(MODEL_NAMES)}. Use a "
            "checkpoint written by crowd train."
        )
    if expect_model is not None and name != expect_model:
        raise CheckpointError(
            f"{path} holds a {name} checkpoint, but a {expect_model} was asked for. Use a "
            f"checkpoint trained with --model {expect_model}."
        )
    kwargs = {k: v for k, v in dict(ckpt.get("model_kwargs") or {}).items() if k not in INIT_ONLY_KWARGS}
    try:
        model = build_model(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: cannot build {name} with {kwargs} ({exc}). Use a checkpoint written by "
            "this version of crowd train."
        ) from exc
    state = ckpt["model"]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: the 'model' entry is a {type(state).__name__}, not a state dict. Use a "
            "checkpoint written by crowd train."
        )
    state = strip_prefix(state)
    check_state_dict(model, state, str(path), name)
    model.load_state_dict(state, strict=True)
    device = config.pick_device() if device is None else torch.device(device)
    model.to(device).eval()
    best = ckpt.get("best_val_mae")
    info = CheckpointInfo(
        path=path,
        model_name=name,
        model_kwargs=kwargs,
        scale=float(ckpt.get("scale", 1.0)) / float(ckpt.get("count_gain", 1.0)),  # see trainer.count_gain
        epoch=ckpt.get("epoch"),
        step=ckpt.get("step"),
        best_val_mae=None if best is None else float(best),
        config=dict(ckpt.get("config") or {}),
    )
    return model, info
