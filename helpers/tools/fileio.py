"""Atomic file writes: a file is either the old good version or the new complete one.

We write to a temporary file in the same folder, flush it to disk, then ``os.replace`` it over
the target. ``os.replace`` is atomic on POSIX and Windows, so a crash, a kill or a full disk in the
middle of a write never leaves a truncated checkpoint or cache file behind.

What a kill (SIGKILL, power loss) can leave is the temporary file itself, named
``.<target name>.pid<writer pid>.<random><suffix>.tmp``: readers never look at it, and
:func:`remove_stale_temp_files` deletes those whose writer process no longer runs (the training
loop does it for its run folder, :func:`helpers.density.build_cache` for the cache folders).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success move it over ``target``.

    Write the whole file to the yielded path (with any library: h5py, torch.save, PIL...).
    If the block raises, the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(  # the pid tells remove_stale_temp_files who writes it
        prefix=f".{target.name}.pid{os.getpid()}.", suffix=suffix + ".tmp", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; use normal permissions
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (POSIX ``flock``); yields whether a real lock is held.

    On Windows there is no ``fcntl``: nothing is locked and the block runs as is (yields False).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


#: Temporary files of :func:`atomic_path`: ``.<name>.pid<pid>.<8 random characters><suffix>.tmp``.
_TEMP_NAME = re.compile(r"^\..+\.pid(?P<pid>[0-9]+)\.[a-z0-9_]{8}[^/]*\.tmp$")


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: keep every file
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or cannot tell: keep its file
    return True


def stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Temporary files of :func:`atomic_path` in ``folder`` whose writer process has ended.

    A killed writer never renames or deletes its temporary file. One whose process still runs
    (on this machine) may be in the middle of a write and is not listed. Processes are checked
    by pid on this machine only: do not share a folder between machines that write to it at the
    same time. On Windows nothing is listed (there is no safe check of a pid there).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match and path.is_file() and not _process_alive(int(match["pid"])):
            stale.append(path)
    return sorted(stale)


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the :func:`stale_temp_files` of ``folder``; returns the paths removed."""
    removed = []
    for path in stale_temp_files(folder):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
