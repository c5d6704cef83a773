"""Atomic writes of one local file: all of the new bytes at the path, or the old file.

Plain `os`, so the tokenizer and the model's checkpoints can use it without the storage layer's
filesystem machinery (`clipforge.pipeline.storage.fs.Location.write_bytes` does the same for any path or URL).
"""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """All of `data` at `path` or the old file: written beside, fsynced, renamed, the folder fsynced (a
    power loss after a checkpoint or tokenizer is "saved" must not leave it empty)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass   # some filesystems refuse fsync on a folder; the data itself is on disk
