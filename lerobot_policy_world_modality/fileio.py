"""Atomic file writes, shared by every part of the plugin that must never leave half a file behind.

Pure standard library, so the pure-torch core (`world/`), the latent cache, the tools and the benchmarks
can all use it without depending on each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"  # temp files are named ".<target>.tmp-<pid>" next to their target


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside directory `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temp file a write of `path` by this process goes through."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one, never a part.

    A failed write (disk full, a signal) removes its temp file before re-raising, so nothing is left
    behind for the next run to trip over.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, **dumps_kwargs: Any) -> None:
    """`atomic_write_bytes` of `json.dumps(data, indent=2, **dumps_kwargs)` plus a final newline."""
    dumps_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(data, **dumps_kwargs) + "\n")


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, ends) -> digest, per process


def file_digest(path: str | Path, ends: int = 0) -> str:
    """sha256 of a file's bytes, memoised while the file is unchanged.

    With `ends` > 0 and a file longer than twice that, only its size and its first and last `ends` bytes
    are hashed: cheap for large videos, and a re-encoding still changes them.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, ends)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if ends and st.st_size > 2 * ends:
                h.update(str(st.st_size).encode())
                h.update(f.read(ends))
                f.seek(-ends, os.SEEK_END)
                h.update(f.read(ends))
            else:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def files_revision(paths) -> str:
    """`sha256:<hex>` over files' names and contents, in the order given: a local model's revision."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode() + b"\0" + file_digest(p).encode() + b"\n")
    return "sha256:" + h.hexdigest()
