"""Atomic file writes (a reader sees the old file or the complete new one, never a torn one), and
file content hashes.

Everything a run writes (checkpoints, models, metrics, reports) goes through these helpers:
write to a temporary file in the same folder, flush and fsync, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import (single-threaded): os.umask can only be read by setting it.
UMASK = _read_umask()


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); a written file gets the permissions any other would.
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda h: h.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch  # here, so that importing this module (e.g. by `mace-mf label`) does not load torch

    _atomic(path, lambda h: torch.save(obj, h))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda h: h.write(data))


def atomic_write_xyz(path: Path, frames: list[Any]) -> None:
    """ASE configurations as one extxyz file (labels in info/arrays as they are)."""
    import io

    import ase.io

    buffer = io.StringIO()
    ase.io.write(buffer, frames, format="extxyz")
    atomic_write_text(path, buffer.getvalue())


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (what caches of derived data are keyed by)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
