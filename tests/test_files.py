"""Atomic writes: the new file appears whole, with the permissions any other file would get."""

from __future__ import annotations

import os
import stat

from mace_mf.files import UMASK, atomic_write_text


def test_an_atomic_write_replaces_whole_and_is_not_private(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o666 & ~UMASK and (UMASK & 0o044 or mode & 0o044)  # readable by others under umask 022
