"""Atomic file writes: a temporary file in the target's directory, fsync, rename.

A process killed at any moment (SIGKILL, a lost node) leaves the target as it was or as the
complete new file, never a torn one: the bytes go to a hidden temporary file beside it
(``.NAME.<random>.tmp``, same filesystem, so the rename is atomic), which is flushed to disk
before ``os.replace`` puts it in place, and the directory is fsynced after, so the rename
itself survives a power loss. A write that fails (a full disk) removes its temporary file and
leaves the target untouched. Used for checkpoints (:mod:`rnndrop.lit`), the studies'
``result.json`` files and the data downloader. Standard library only.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["TMP_SUFFIX", "atomic_write", "fsync_dir", "remove_stale", "replace", "temp_path"]

#: the suffix of the temporary files (never ``.ckpt`` or ``.json``: globs for those skip them)
TMP_SUFFIX = ".tmp"


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary name beside ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where unsupported."""
    with contextlib.suppress(OSError):  # some filesystems (and Windows) refuse a dir fsync
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace`` that also makes the rename durable (fsync of the directory)."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit fsync it and rename
    it to ``path``; on any exception remove it and leave ``path`` as it was.

    ``mode`` is ``"wb"`` or ``"w"`` (text; ``kwargs`` go to :func:`open`, e.g. ``encoding``).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    try:
        # "x": a new file with the umask's permissions (mkstemp would make it 0600)
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed writer of ``path`` left behind; return them.

    Only for targets a single process writes (a run's checkpoints): a concurrent writer's
    temporary file would go too.
    """
    path = Path(path)
    stale = list(path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"))
    for p in stale:
        with contextlib.suppress(OSError):
            p.unlink()
    return stale
