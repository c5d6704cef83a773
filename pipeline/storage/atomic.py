"""Atomic writes of one local file: all of the new bytes at the path, or the old file.

Plain `os`, so the tokenizer and the model's checkpoints can use it without the storage layer's
filesystem machinery; `clipforge.pipeline.storage.fs.Location.write_bytes` uses it for local paths.
"""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes, sync_dir: bool = True) -> None:
    """All of `data` at `path` or the old file: written beside (a name of this process's), fsynced,
    renamed, the folder fsynced (a power loss after a checkpoint or a shard's record is "saved" must not
    leave it empty). `sync_dir=False` leaves the folder to a later write in it that syncs it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry lives in the directory's own blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass   # some filesystems refuse fsync on a directory; the file data itself was fsynced
    finally:
        os.close(fd)
