"""Experiment tracking: Weights & Biases when enabled, a null tracker otherwise.

The rest of the code talks to a :class:`Tracker`; nothing else imports wandb. Metric names follow
one scheme: ``train/loss``, ``train/<fidelity>/e_mse``, ``valid/<fidelity>/f_rmse_meV_A``,
``lr/<block>``, with ``epoch`` as the x axis.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mace_mf.recipe import Recipe

log = logging.getLogger(__name__)


def flatten_epoch(record: dict[str, Any]) -> dict[str, float]:
    """A history record as flat W&B metric names (None values dropped)."""
    flat: dict[str, float] = {
        "epoch": record["epoch"],
        "valid/loss": record["valid_loss"],
        "epoch_time_s": record["epoch_time_s"],
    }
    if record.get("configs_per_s") is not None:
        flat["configs_per_s"] = record["configs_per_s"]
    for key, value in record["train"].items():
        flat[f"train/{key}"] = value
    for fidelity, metrics in record["valid"].items():
        for key, value in metrics.items():
            if value is not None and not key.startswith("n_"):
                flat[f"valid/{fidelity}/{key}"] = value
    for block, lr in record["lr"].items():
        flat[f"lr/{block}"] = lr
    return flat


class Tracker:
    """Does nothing: the interface the training run talks to."""

    run_id: str | None = None

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Per-epoch metrics."""

    def log_final(self, metrics: dict[str, Any], files: list[Path]) -> None:
        """Final test metrics and produced files."""

    def finish(self, failed: bool = False) -> None:
        """Close the run."""


class WandbTracker(Tracker):
    """A W&B run whose config is the full resolved recipe."""

    def __init__(self, recipe: Recipe, out: Path, recipe_file: Path | None, resume_id: str | None) -> None:
        import wandb

        spec = recipe.wandb
        mode = spec.mode
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
            log.warning("wandb: no API key found; logging offline. Upload later with `wandb sync %s/wandb`", out)
            mode = "offline"
        self._wandb = wandb
        self.run = wandb.init(
            project=spec.project,
            entity=spec.entity,
            group=spec.group,
            tags=spec.tags or None,
            name=spec.name or recipe.name,
            config=recipe.model_dump(mode="json"),
            mode=mode,
            dir=os.environ.get("WANDB_DIR", str(out)),
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        self.run_id = self.run.id
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        target = recipe.target
        self.run.define_metric(f"valid/{target}/f_rmse_meV_A", summary="min")
        self.run.define_metric(f"valid/{target}/e_rmse_meV_atom", summary="min")
        if recipe_file is not None:
            self.run.save(str(recipe_file), base_path=str(recipe_file.parent), policy="now")

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.run.log(flatten_epoch(record))

    def log_final(self, metrics: dict[str, Any], files: list[Path]) -> None:
        self.run.summary.update(
            {
                f"final/{split}/{fidelity}/{key}": value
                for split, per_fidelity in metrics.items()
                for fidelity, values in per_fidelity.items()
                for key, value in values.items()
                if value is not None
            }
        )

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_tracker(recipe: Recipe, out: Path, recipe_file: Path | None, resume_id: str | None) -> Tracker:
    if recipe.wandb.mode == "disabled":
        return Tracker()
    return WandbTracker(recipe, out, recipe_file, resume_id)
