"""Atomic writes (DESIGN.md §7): a file or folder that readers can see is whole, never half-written.

Every writer stages under a name of its own (``.<name>.<pid>.<random>.tmp`` beside the target) and publishes with one
rename. Two ranks that fill the same cache entry at once therefore never touch each other's staging files, which a
shared ``<name>.tmp`` would let them do. Checkpoints (``train.py``) are the one exception: all ranks write shards into
one staging folder that the main process renames after a barrier.

A rename is atomic against a crash of the process, not against a power loss: the file system may persist the rename
before the data. So what is published is flushed to disk first (``sync_tree``), and the folder holding the new name
after; otherwise a checkpoint could come back empty after a power cut while pruning had already removed the older one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _fsync(path: Path, *, folder: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    except OSError:  # folders cannot be opened on Windows; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
        # some network and FUSE file systems cannot fsync a folder (EINVAL): the files themselves are flushed
    finally:
        os.close(fd)


def sync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    _fsync(Path(path), folder=True)


def sync_tree(path: str | Path) -> None:
    """Flush every file under ``path`` (or the file ``path``) and the folders holding them to disk."""
    path = Path(path)
    if path.is_file():
        _fsync(path)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root), folder=True)


def _staging(path: Path, suffix: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{suffix}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a staging path to write; when the block succeeds it replaces ``path`` in one ``os.replace``.

    If the block raises, ``path`` is left as it was and the staging file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging(path)
    try:
        yield tmp
        sync_tree(tmp)
        os.replace(tmp, path)
        sync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it is published as ``path`` by one rename.

    Args:
        replace: ``True`` (exports, rebuilt assets): an existing ``path`` is moved aside, the new folder renamed in,
            the old one deleted; readers see the old folder or the new one, never a mix. ``False`` (caches that
            several processes may fill at once): the first folder published wins and a later one is dropped,
            so every process goes on to read the same copy.

    If the block raises, ``path`` is left as it was and the staging folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        sync_tree(tmp)
        if replace and path.exists():
            old = _staging(path, "old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(path)
            except OSError:  # another process published a non-empty folder first
                if not path.exists():
                    raise
        sync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
