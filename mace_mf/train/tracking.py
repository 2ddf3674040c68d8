"""Experiment tracking: Weights & Biases when enabled, a null tracker otherwise.

The rest of the code talks to a :class:`Tracker`; nothing else imports wandb for runs (sweeps
import it in ``sweep.py``). Metric names follow one scheme, defined here and nowhere else so that
sweeps rank trials by exactly the names W&B shows:

- per epoch (x axis ``epoch``): ``train/loss``, ``train/<fidelity>/e_mse`` and ``f_mse`` (unweighted
  terms, eV²/atom² and eV²/Å²), ``valid/loss`` (the target's weighted validation loss),
  ``valid/<fidelity>/{e,f}_{rmse,mae}_…`` (meV/atom, meV/Å), ``lr/<parameter group>``,
  ``epoch_time_s``, ``configs_per_s``;
- at the end (summary): ``final/<split>/<fidelity>/<metric>``, ``forgetting/...`` (a run with
  ``replay:``: ``forgetting.json``, mace_mf.workflows.replay), the table ``final/metrics``, images
  ``plots/<plot name>``, and the exported models as a ``model`` artifact.

A run that resumes passes the W&B id stored in ``run.json``, so the W&B run continues too. Online
without an API key or without a reachable server falls back to offline and says, in one line, how
to upload later.

Offline runs are only as durable as their ``.wandb`` transaction log. wandb-core buffers it and by
default writes it every 15 s, so a run killed in between (``kill -9``, the OOM killer, a lost node)
used to leave a file holding the header alone: no run record, nothing to sync, the epochs before
the last checkpoint gone. The log is flushed every :data:`FLUSH_INTERVAL_S` here, so what was
logged before a checkpoint is on disk before the next epoch ends. A resumed part that starts in
the same second as the earlier one goes to ``offline-run-<time>-<id>-1``: the sync command printed
covers every part.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mace_mf.config.schema import Recipe
from mace_mf.evaluation.metrics import METRIC_KEYS, PAIR_KEYS
from mace_mf.quiet import WANDB_NOISE, dropped_lines
from mace_mf.run_folder import HEADS_LIST, RunFolder
from mace_mf.version import versions

log = logging.getLogger(__name__)

EPOCH_SCALARS = ("train/loss", "valid/loss", "epoch_time_s", "configs_per_s")
TRAIN_TERMS = ("e_mse", "f_mse")
VALID_KEYS = tuple(k for k in METRIC_KEYS if not k.startswith("n_") and k not in PAIR_KEYS)  # per epoch
LR_GROUPS = ("embedding", "interactions", "products", "readouts", "other")
SPLITS = ("train", "valid", "test")
FLUSH_INTERVAL_S = 1.0  # seconds between writes of the offline transaction log (wandb's default: 15)


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


def flatten_final(metrics: dict[str, Any]) -> dict[str, float]:
    """Final metrics (``metrics.json``) as ``final/<split>/<fidelity>/<metric>`` (None dropped)."""
    return {
        f"final/{split}/{fidelity}/{key}": value
        for split, per_fidelity in metrics.items()
        for fidelity, values in per_fidelity.items()
        for key, value in values.items()
        if value is not None
    }


def flatten_forgetting(record: dict[str, Any]) -> dict[str, float]:
    """``forgetting.json`` as ``forgetting/<drift metric>`` and ``forgetting/md_stable_<model>`` (a share)."""
    flat = {f"forgetting/{k}": v for k, v in record["drift"].items() if v is not None}
    for name, check in (record.get("md_check") or {}).items():
        flat[f"forgetting/md_stable_{name}"] = check["passed"] / max(check["structures"], 1)
    return flat


def metric_names(recipe: Recipe) -> list[str]:
    """Every scalar name a run of ``recipe`` can log (some may stay absent for lack of labels)."""
    names = list(EPOCH_SCALARS)
    for fidelity in recipe.fidelities:
        names += [f"train/{fidelity}/{term}" for term in TRAIN_TERMS]
        names += [f"valid/{fidelity}/{key}" for key in VALID_KEYS]
    names += [f"lr/{group}" for group in LR_GROUPS]
    names += [f"final/{split}/{f}/{key}" for split in SPLITS for f in recipe.fidelities for key in METRIC_KEYS]
    return names


class Tracker:
    """Does nothing: the interface the training run talks to."""

    run_id: str | None = None

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Per-epoch metrics."""

    def log_final(
        self,
        out: Path,
        metrics: dict[str, Any],
        files: list[Path],
        metadata: dict[str, Any],
        forgetting: dict[str, Any] | None = None,
    ) -> None:
        """Final metrics, the forgetting record, plots, report and exported models (``files``) of ``out``."""

    def finish(self, failed: bool = False) -> None:
        """Close the run."""


class WandbTracker(Tracker):
    """A W&B run whose config is the full resolved recipe."""

    def __init__(self, recipe: Recipe, out: Path, recipe_file: Path | None, resume_id: str | None) -> None:
        import wandb

        spec = recipe.wandb
        mode, reason = effective_mode(spec.mode)
        self._wandb = wandb
        self._quiet = ExitStack()  # for the run's life: wandb wraps stderr for its console log at init
        self._quiet.enter_context(wandb_quiet())
        try:
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
                settings=durable_settings(wandb),
            )
        except BaseException:
            self._quiet.close()
            raise
        self.run_id = self.run.id
        self.offline = mode == "offline"
        if reason is not None:
            log.warning("wandb: %s; logging offline. Upload later with `wandb sync %s`", reason, self.sync_glob)
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        target = recipe.target
        self.run.define_metric("valid/loss", summary="min")
        self.run.define_metric(f"valid/{target}/f_rmse_meV_A", summary="min")
        self.run.define_metric(f"valid/{target}/e_rmse_meV_atom", summary="min")
        if recipe_file is not None:
            self.run.save(str(recipe_file), base_path=str(recipe_file.parent), policy="now")

    @property
    def sync_glob(self) -> str:
        """The run's offline folders, the first one and any resumed parts (``...-<id>`` and, for a
        part started in the same second as the one before, ``...-<id>-1``): what `wandb sync` takes."""
        return str(Path(self.run.dir).parent.parent / f"offline-run-*-{self.run.id}*")

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.run.log(flatten_epoch(record))

    def log_final(
        self,
        out: Path,
        metrics: dict[str, Any],
        files: list[Path],
        metadata: dict[str, Any],
        forgetting: dict[str, Any] | None = None,
    ) -> None:
        wandb = self._wandb
        self.run.summary.update(flatten_final(metrics))
        if forgetting:
            self.run.summary.update(flatten_forgetting(forgetting))
        columns = ["split", "fidelity", *METRIC_KEYS]
        rows = [
            [split, fidelity, *(values.get(k) for k in METRIC_KEYS)]
            for split, per_fidelity in metrics.items()
            for fidelity, values in per_fidelity.items()
        ]
        media: dict[str, Any] = {"final/metrics": wandb.Table(columns=columns, data=rows)}
        folder = RunFolder(out)
        for plot in sorted(folder.plots.glob("*.png")):
            media[f"plots/{plot.stem}"] = wandb.Image(str(plot), caption=plot.stem)
        self.run.log(media)
        for path in (folder.report, folder.metrics):
            if path.is_file():
                self.run.save(str(path), base_path=str(out), policy="now")
        self.run.log_artifact(model_artifact(wandb, self.run.id, out, files, metadata), aliases=["best", "latest"])

    def finish(self, failed: bool = False) -> None:
        try:
            self.run.finish(exit_code=1 if failed else 0)
        finally:
            self._quiet.close()
        if self.offline:
            log.info("wandb: offline run %s; upload with `wandb sync %s`", self.run.id, self.sync_glob)


def wandb_quiet() -> Any:
    """wandb's lines that contradict the recipe (its advice to go online) or repeat on every save."""
    return dropped_lines("stderr", *WANDB_NOISE)


def durable_settings(wandb: Any) -> Any:
    """W&B settings that write the offline transaction log every :data:`FLUSH_INTERVAL_S` (the
    setting is in wandb 0.31; a release without it keeps its own default)."""
    name = "x_transaction_log_flush_interval"
    if name not in getattr(wandb.Settings, "model_fields", {}):
        return None
    return wandb.Settings(**{name: FLUSH_INTERVAL_S})


def model_artifact(wandb: Any, run_id: str, out: Path, files: list[Path], metadata: dict[str, Any]) -> Any:
    """The exported models (best weights of the run) with what is needed to use them.

    Named ``model-<run id>`` as W&B's own integrations do, so each run's models are one artifact
    whose versions follow resumes. Files are added ``immutable``: the run folder's exported files
    are final, so W&B references them instead of copying them to its staging area.
    """
    artifact = wandb.Artifact(
        name=f"model-{run_id}",
        type="model",
        description="mace_mf fine-tuned models (best epoch); load with mace.calculators.MACECalculator",
        metadata={**metadata, **versions()},
    )
    folder = RunFolder(out)
    extras = [folder.models / HEADS_LIST, folder.resolved_recipe, folder.metrics, folder.report]
    for path in [*files, *extras]:
        if path.is_file():
            artifact.add_file(str(path), name=str(path.relative_to(out)), policy="immutable")
    return artifact


def effective_mode(mode: str) -> tuple[str, str | None]:
    """The mode W&B can honour here, and why it differs from the one asked for (None if it does not)."""
    if mode != "online":
        return mode, None
    if not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
        return "offline", "no API key found (set WANDB_API_KEY or run `wandb login`)"
    host = _server_host()
    if not _reachable(host):
        return "offline", f"{host} is not reachable"
    return "online", None


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    host = _server_host()
    return netrc.is_file() and host in netrc.read_text(errors="ignore")


def _server_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """A TCP connection to the W&B server within ``timeout`` (wandb itself would wait 90 s)."""
    port = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def make_tracker(recipe: Recipe, out: Path, recipe_file: Path | None, resume_id: str | None) -> Tracker:
    """The run's tracker. The recipe decides the mode: a ``WANDB_MODE`` in the environment does not
    switch a disabled run on (the log says so, since a user who set it expects a W&B run)."""
    if recipe.wandb.mode == "disabled":
        asked = os.environ.get("WANDB_MODE")
        if asked and asked != "disabled":
            log.info(
                "wandb: disabled by the recipe (wandb.mode: disabled), so WANDB_MODE=%s is not used; "
                "set wandb.mode or pass --wandb %s to log this run",
                asked,
                "offline" if asked == "dryrun" else asked,
            )
        return Tracker()
    return WandbTracker(recipe, out, recipe_file, resume_id)
