"""Files written so that a crash at any moment leaves the old file or the new one, never a torn one:
a temporary file beside the target, synced to disk, renamed over it, and the rename synced."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file to write `path`; on a clean exit it replaces `path`, on an error it
    is removed. (Writers that stage through the system temp folder and move the file get a copy
    without sync when that folder is on another filesystem.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file or folder into place, durably."""
    os.replace(tmp, path)
    sync_folder(Path(path).parent)


def sync_folder(folder: Path) -> None:
    """Make renames and new entries in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json(path, doc: dict) -> None:
    """Write `doc` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        f.write(json.dumps(doc, indent=2, default=str))
