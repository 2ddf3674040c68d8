"""The run folder: the one place that names what a run writes, and says whether a run is there.

Every command that reads or writes a run (train, resume, bench arms, sweep trials, the upstream arm,
eval, export, tracking) goes through :class:`RunFolder`, so a file renamed here is renamed for all
of them, and "has a run started here?" has one answer.

::

    <run>/run.json                 status (running, complete, failed, interrupted), versions, W&B id
    <run>/recipe.resolved.yaml     the recipe with every default filled in
    <run>/train.log                the run's log at INFO level
    <run>/checkpoints/             epoch-NNNN.pt and latest.json (mace_mf.train.checkpoint)
    <run>/history.json             per-epoch records
    <run>/zero_shot_metrics.json   errors before training
    <run>/metrics.json             errors of the best weights, per split and fidelity
    <run>/pair_errors.json         per-pair errors of the validation displacement pairs
    <run>/md_check.json            the MD stability check of the target head
    <run>/forgetting.json          beyond the fine-tuning data: the foundation level's drift and MD checks
    <run>/models/                  exported files (mace_mf.model.export)
    <run>/plots/                   parity plots and the learning curve
    <run>/report.md                the readable report
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mace_mf.files import atomic_write_text

RUN = "run.json"
RESOLVED = "recipe.resolved.yaml"
LOG = "train.log"
HISTORY = "history.json"
ZERO_SHOT = "zero_shot_metrics.json"
METRICS = "metrics.json"
PAIR_ERRORS = "pair_errors.json"
MD_CHECK = "md_check.json"
FORGETTING = "forgetting.json"
REPORT = "report.md"
CHECKPOINTS = "checkpoints"
MODELS = "models"
PLOTS = "plots"
WANDB = "wandb"
MULTIHEAD = "multihead.model"
HEADS_LIST = "HEADS.txt"


@dataclass(frozen=True)
class RunFolder:
    """A run's folder and the paths of everything in it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def record_file(self) -> Path:
        return self.path / RUN

    @property
    def resolved_recipe(self) -> Path:
        return self.path / RESOLVED

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def history(self) -> Path:
        return self.path / HISTORY

    @property
    def zero_shot(self) -> Path:
        return self.path / ZERO_SHOT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def pair_errors(self) -> Path:
        return self.path / PAIR_ERRORS

    @property
    def md_check(self) -> Path:
        return self.path / MD_CHECK

    @property
    def forgetting(self) -> Path:
        return self.path / FORGETTING

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def models(self) -> Path:
        return self.path / MODELS

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    def model(self, fidelity: str) -> Path:
        """The exported single-head file of ``fidelity``."""
        return self.models / f"{fidelity}.model"

    @property
    def multihead(self) -> Path:
        return self.models / MULTIHEAD

    def started(self) -> bool:
        """A run has begun here (its record or a checkpoint exists): resume it or overwrite it, never
        silently start another one on top of it."""
        return self.record_file.is_file() or self.checkpoints.is_dir()

    def read_record(self) -> dict[str, Any]:
        """``run.json`` (empty when it does not exist or is unreadable)."""
        try:
            return json.loads(self.record_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write_record(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.record_file, json.dumps(record, indent=2))

    def status(self) -> str | None:
        """``running``, ``complete``, ``failed``, ``interrupted``, or None where no run is recorded."""
        return self.read_record().get("status")

    def complete(self) -> bool:
        return self.status() == "complete"

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics.read_text())

    def write_json(self, path: Path, value: Any) -> None:
        """One of the run's JSON files, written atomically."""
        atomic_write_text(path, json.dumps(value, indent=2))

    def clear(self) -> None:
        """Remove everything a run writes (``--overwrite``); files the user put here stay."""
        for name in (CHECKPOINTS, MODELS, PLOTS, WANDB):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (RUN, METRICS, ZERO_SHOT, REPORT, RESOLVED, HISTORY, LOG, MD_CHECK, PAIR_ERRORS):
            (self.path / name).unlink(missing_ok=True)
