"""Overwrite before delete: refused or abandoned upload bytes (which may hold a secret key a
client sent by mistake) are zeroed and flushed before their file is unlinked.

Used for every upload that does not become a session, for predict bodies spilled to RAM files
when the request fails, and at start-up for whatever a kill -9 left in the upload folders.
Scope: this defeats reading the bytes back through the filesystem or a plain disk image of a
conventional file system; a copy-on-write or log-structured file system, or an SSD's
remapping, may keep old blocks (docs/SERVICE.md, "Secret keys").
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

_ZEROS = bytes(1 << 20)


def shred(path: str | Path) -> None:
    """Zero the file's bytes, fsync, unlink. Missing files are fine; never raises."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:  # gone already, or a symlink: nothing of ours to overwrite
        Path(path).unlink(missing_ok=True)
        return
    try:
        left = os.fstat(fd).st_size
        while left > 0:
            left -= os.write(fd, _ZEROS[: min(left, len(_ZEROS))])
        os.fsync(fd)
    except OSError:  # a full disk cannot refuse overwriting blocks it has, but be safe
        pass
    finally:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


def shred_tree(path: str | Path) -> None:
    """shred() every regular file under `path`, then remove the tree."""
    p = Path(path)
    if p.is_symlink() or p.is_file():
        shred(p)
        return
    if not p.is_dir():
        return
    for root, _dirs, files in os.walk(p):
        for name in files:
            f = os.path.join(root, name)
            if not os.path.islink(f):
                shred(f)
    shutil.rmtree(p, ignore_errors=True)


def ram_spill_dir(data_dir: Path) -> Path | None:
    """A private folder in RAM (/dev/shm) for large predict bodies, one per data directory, so
    that the next start can find and shred what a killed server left there. None without a
    writable /dev/shm."""
    if not os.access("/dev/shm", os.W_OK):
        return None
    tag = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    d = Path("/dev/shm") / f"heinfer-{os.getuid()}-{tag}"
    try:
        d.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    if d.is_symlink() or d.stat().st_uid != os.getuid():
        return None  # someone else's: do not write there
    return d
