"""Checkpoints: what an epoch leaves on disk to continue from, with a format version and upgrades.

``<run>/checkpoints/epoch-NNNN.pt`` is written atomically each epoch, then ``latest.json`` names it;
the two newest are kept. A torn or corrupt newest file falls back to the one before it.

Each file carries ``format``. Loading upgrades an older format in memory, one step at a time
(:data:`UPGRADES`), so a run interrupted under an older mace_mf resumes under a newer one; a format
newer than this code knows is refused with the fix. Formats:

1. model, optimizer, scheduler, EMA, best weights, history, RNG states, epoch, seed;
2. adds ``versions``: the mace_mf, mace-torch and torch that wrote it (a resumed run's log says what
   it continues). Format 1 files get ``{"mace_mf": "unknown (format 1)"}``.

A change to what a checkpoint holds adds a format and its upgrade step here, and a stored file of the
old format under ``tests/data/`` that the tests resume from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mace_mf.errors import RunError
from mace_mf.files import atomic_torch_save, atomic_write_text
from mace_mf.version import versions

log = logging.getLogger(__name__)

FORMAT = 2
KEEP = 2  # newest checkpoints kept: the last one, and one to fall back to if it is torn
LATEST = "latest.json"


def _format_1_to_2(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "format": 2, "versions": {"mace_mf": "unknown (format 1)"}}


# format N -> the function that turns a format-N state into format N + 1
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _format_1_to_2}


def upgrade(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """``state`` in the current :data:`FORMAT`, upgraded step by step from the one it was written in."""
    written = state.get("format")
    if not isinstance(written, int) or written < 1:
        raise RunError(f"{path}: not a mace_mf checkpoint (no format); start a new --out")
    if written > FORMAT:
        raise RunError(
            f"{path}: checkpoint format {written} was written by a newer mace_mf (this one reads up to {FORMAT}); "
            "upgrade mace_mf to resume it, or start a new --out"
        )
    while state["format"] < FORMAT:
        state = UPGRADES[state["format"]](state)
    return state


class Checkpoints:
    """The checkpoint files of one run folder: the one place that names and rotates them."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.pt"

    def files(self) -> list[Path]:
        """Every checkpoint file, oldest first."""
        return sorted(self.folder.glob("epoch-*.pt"))

    def save(self, state: dict[str, Any], epoch: int) -> Path:
        """Write ``state`` (format and versions added) for ``epoch``; point ``latest.json`` at it; keep
        the newest :data:`KEEP`."""
        path = self.path(epoch)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"format": FORMAT, "versions": versions(), "epoch": epoch, **state}, path)
        atomic_write_text(self.folder / LATEST, json.dumps({"complete": path.name, "epoch": epoch}))
        for old in self.files()[:-KEEP]:
            old.unlink()
        return path

    def load_latest(self, map_location: torch.device | str) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint, upgraded to the current format; None if there is none."""
        for path in reversed(self.files()):
            try:
                state = torch.load(path, map_location=map_location, weights_only=False)
            except Exception as exc:  # a torn or corrupt file: try the previous checkpoint
                log.warning("checkpoint %s unreadable (%s); trying the previous one", path, type(exc).__name__)
                continue
            return path, upgrade(state, path)
        return None
