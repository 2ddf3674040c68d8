"""One training run, end to end, in the order data flows:

recipe → foundation → labels → data → fidelity heads (+E0) → train → evaluate → export → report.

"labels" computes the fidelities a recipe declares with ``labels:`` (mace_mf.labels.labelling), into a
cache shared by runs; the data are then read from the labelled copies, while the recipe written to
the run folder keeps the original paths.

The run folder is owned by one run: an existing run is never overwritten unless asked
(``overwrite``) and an interrupted one continues from its last checkpoint (``resume``).

Under ``torchrun`` every process runs :func:`train_run`: rank 0 claims the folder and tells the
others how it went, every rank builds the same model and data and trains its shard, and rank 0
alone evaluates, exports, reports and tracks (mace_mf.train.distributed).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mace_mf.config.loading import dump_recipe, recipe_changes, recipe_from_dict
from mace_mf.config.schema import REPLAY_FIDELITY, Recipe
from mace_mf.data.splits import Splits
from mace_mf.errors import RunError, UserError
from mace_mf.evaluation.md_check import md_check, write_md_check
from mace_mf.evaluation.scoring import evaluate_all
from mace_mf.files import atomic_write_text
from mace_mf.model.build import resolve_device
from mace_mf.model.cueq import to_e3nn
from mace_mf.model.export import export_models
from mace_mf.model.foundation import FoundationInfo, load_foundation, load_model_file
from mace_mf.model.heads import extract_head
from mace_mf.run_folder import RunFolder
from mace_mf.train.distributed import Dist, broadcast, local_batch_size, local_device, session
from mace_mf.train.threads import default_threads
from mace_mf.train.tracking import make_tracker
from mace_mf.train.trainer import Trainer
from mace_mf.version import versions
from mace_mf.workflows.prepare import prepare
from mace_mf.workflows.report import write_report
from mace_mf.workflows.transfer import FIRST_STAGE, first_stage, second_stage

log = logging.getLogger(__name__)


def default_out(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_out(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Claim the output folder; return the earlier run's record when resuming."""
    folder = RunFolder(out)
    started = folder.started()
    if resume:
        if not started:
            raise RunError(f"{out}: no run to resume here; drop --resume to start a new run")
        return folder.read_record()
    if started and not overwrite:
        raise RunError(
            f"{out}: already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    if started:
        folder.clear()
    out.mkdir(parents=True, exist_ok=True)
    return None


def model_metadata(recipe: Recipe, info: FoundationInfo, best_epoch: int) -> dict[str, Any]:
    """What a user of the exported files needs to know without opening them."""
    return {
        "fidelities": list(recipe.fidelities),
        "exported": recipe.export_fidelities,
        "target": recipe.target,
        "elements": info.elements,
        "r_max": info.r_max,
        "foundation": info.source,
        "foundation_head": info.head,
        "dtype": recipe.dtype,
        "trained_with": "cuequivariance" if recipe.training.cueq else "e3nn",
        "best_epoch": best_epoch,
    }


def final_md_check(model: torch.nn.Module, recipe: Recipe, splits: Splits, out: Path) -> dict[str, Any] | None:
    """Short NVE MD of the target head from a few test (else valid) geometries, into ``md_check.json``.

    The exported file is what a user will run, so it is checked when it was written; otherwise the
    same head extracted in memory. A failure is reported (log, report.md), not fatal: the run's
    models are still the best this recipe gives.
    """
    spec = recipe.md_check
    if not spec.enabled:
        return None
    split = splits.test if splits.test is not None else splits.valid
    folder = RunFolder(out)
    exported = folder.model(recipe.target)
    if exported.is_file():
        candidate, source = load_model_file(exported)[0], str(exported.relative_to(out))
    else:
        candidate, source = extract_head(model, recipe.target), f"head {recipe.target} (not exported)"
    structures = [split.atoms(i) for i in range(min(spec.structures, len(split)))]
    record = md_check(candidate, structures, None, spec.options(), recipe.seed, source)
    record["structures_file"] = f"{split.name} split, first {min(spec.structures, len(split))}"
    write_md_check(record, folder.md_check)
    (log.info if record["passed"] else log.warning)("%s", record["summary"])
    return record


def forgetting_check(
    model: torch.nn.Module, recipe: Recipe, splits: Splits, metrics: dict[str, Any], out: Path
) -> dict[str, Any] | None:
    """Beyond the fine-tuning data (a run with ``replay:``): the foundation level's drift on the
    held-out replay geometries (``metrics``), and ``md_check``'s MD of the target head and of the
    foundation itself from the first ``replay.md_check`` of them, into ``forgetting.json``."""
    spec = recipe.replay
    held = metrics.get("valid", {}).get(REPLAY_FIDELITY)
    if spec is None or not spec.enabled or not held:
        return None
    record: dict[str, Any] = {
        "held_out": held["n_f"],
        "drift": {k: held.get(k) for k in ("f_rmse_meV_A", "e_rmse_meV_atom")},
        "replayed": spec.energy_weight > 0 or spec.forces_weight > 0,
        "md_check": None,
    }
    if recipe.md_check.enabled and spec.md_check:
        h = list(recipe.fidelities).index(REPLAY_FIDELITY)
        rows = np.flatnonzero(splits.valid.table.energy_mask[:, h])[: spec.md_check]
        structures = [splits.valid.atoms(int(i)) for i in rows]
        foundation, info = load_foundation(recipe.foundation.model, recipe.foundation.head, torch.float64)
        options = recipe.md_check.options()
        checks = {
            "target": md_check(extract_head(model, recipe.target), structures, None, options, recipe.seed),
            "foundation": md_check(extract_head(foundation, info.head), structures, None, options, recipe.seed),
        }
        record["md_check"] = {
            name: {
                "passed": sum(s["passed"] for s in check["structures"]),
                "structures": len(structures),
                "summary": check["summary"],
            }
            for name, check in checks.items()
        }
        log.info(
            "forgetting: MD beyond the fine-tuning data: target head %d/%d stable, foundation %d/%d",
            record["md_check"]["target"]["passed"],
            len(structures),
            record["md_check"]["foundation"]["passed"],
            len(structures),
        )
    RunFolder(out).write_json(RunFolder(out).forgetting, record)
    return record


def train_run(
    recipe: Recipe, out: Path, recipe_file: Path | None = None, resume: bool = False, overwrite: bool = False
) -> Path:
    """Run a recipe into ``out``; return ``out``.

    Under torchrun (``WORLD_SIZE`` > 1) each process calls this; only rank 0 writes into ``out``.
    With ``transfer.enabled`` the run is two runs (:mod:`mace_mf.workflows.transfer`): the recipe into
    ``out/multi-fidelity``, then the target fidelity alone from its model into ``out``; resuming goes on
    with the stage that is not complete.
    """
    if not recipe.transfer.enabled:
        return _stage_run(recipe, out, recipe_file, resume, overwrite)
    first, first_recipe = out / FIRST_STAGE, first_stage(recipe)
    with session(resolve_device(recipe.device)):  # one process group for both stages (under torchrun)
        if resume and RunFolder(first).complete():
            _check_resumable(first, first_recipe)
            log.info("transfer: the first stage is complete in %s", first)
        else:
            _stage_run(first_recipe, first, recipe_file, resume, overwrite)
        second = second_stage(recipe, RunFolder(first).model(recipe.target).resolve())
        log.info("transfer: second stage, %s alone from %s", recipe.target, second.foundation.model)
        return _stage_run(second, out, recipe_file, resume and RunFolder(out).started(), overwrite)


def _stage_run(recipe: Recipe, out: Path, recipe_file: Path | None, resume: bool, overwrite: bool) -> Path:
    """One run of a single-stage recipe into ``out``."""
    started = time.perf_counter()
    with session(resolve_device(recipe.device)) as dist:
        local_batch_size(recipe.training.batch_size, dist)  # every rank refuses, before any folder exists
        if not dist.is_main:
            status, previous = broadcast(dist, None)
            if status != "claimed":
                raise RunError(f"{out}: rank 0 stopped before training; its error above says why")
            _train_run(recipe, out, recipe_file, previous, started, dist)
            return out
        fresh = not out.exists()
        try:
            previous = _claim(recipe, out, resume, overwrite)
        except BaseException as exc:
            broadcast(dist, (str(exc) or type(exc).__name__, None))
            raise
        broadcast(dist, ("claimed", previous))
        return _logged_run(recipe, out, recipe_file, previous, started, fresh, dist)


def _claim(recipe: Recipe, out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Take ``out`` for this run (checking a resumed run's recipe); the earlier run's record."""
    previous = prepare_out(out, resume, overwrite)
    if resume:
        _check_resumable(out, recipe)
    atomic_write_text(RunFolder(out).resolved_recipe, dump_recipe(recipe))
    return previous


def _check_resumable(out: Path, recipe: Recipe) -> None:
    """Refuse to resume the run in ``out`` with another recipe."""
    if changes := changes_from_saved(out, recipe):
        raise RunError(
            f"{RunFolder(out).resolved_recipe}: the recipe differs from the run being resumed ({changes}); "
            "resume with the same recipe and --set options, or start a new --out"
        )


def changes_from_saved(out: Path, recipe: Recipe) -> str:
    """How ``recipe`` differs from the resolved recipe saved in run folder ``out`` (its first three
    changed keys, ``key: old -> new``); empty when they are equal or nothing is saved."""
    resolved = RunFolder(out).resolved_recipe
    if not resolved.is_file():
        return ""
    saved = recipe_from_dict(yaml.safe_load(resolved.read_text()), str(resolved), out)
    return "; ".join(recipe_changes(saved, recipe)[:3])


def _logged_run(
    recipe: Recipe,
    out: Path,
    recipe_file: Path | None,
    previous: dict[str, Any] | None,
    started: float,
    fresh: bool,
    dist: Dist,
) -> Path:
    """Rank 0's run, with ``train.log`` kept in ``out``."""
    # train.log records the run at INFO level whatever the console shows.
    package_log = logging.getLogger("mace_mf")
    file_handler = logging.FileHandler(RunFolder(out).log_file)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.INFO)
    previous_level = package_log.level
    if package_log.getEffectiveLevel() > logging.INFO:
        package_log.setLevel(logging.INFO)
    package_log.addHandler(file_handler)
    rejected = False
    try:
        return _train_run(recipe, out, recipe_file, previous, started, dist)
    except UserError as exc:
        rejected = not RunFolder(out).record_file.is_file()  # refused before the run began
        # The console prints the error; train.log keeps it too, for a run that leaves a folder.
        file_handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "stopped: %s", (exc,), None))
        raise
    finally:
        package_log.removeHandler(file_handler)
        package_log.setLevel(previous_level)
        file_handler.close()
        if rejected and previous is None:
            _unclaim(out, fresh)


def _peer_training(
    model: torch.nn.Module,
    recipe: Recipe,
    splits: Splits,
    device: torch.device,
    out: Path,
    previous: dict[str, Any] | None,
    dist: Dist,
) -> Path:
    """A non-zero rank's part of a run: train its shards in step with rank 0, write nothing."""
    trainer = Trainer(model, recipe, splits.train, splits.valid, device, RunFolder(out).checkpoints, None, dist)
    if previous is not None:
        trainer.load_checkpoint()
    if recipe.training.epochs > 0:
        trainer.fit()
    return out


def _unclaim(out: Path, fresh: bool) -> None:
    """Input rejected before anything ran: leave no folder that could pass for a run."""
    folder = RunFolder(out)
    for path in (folder.resolved_recipe, folder.log_file):
        path.unlink(missing_ok=True)
    if fresh and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _train_run(
    recipe: Recipe, out: Path, recipe_file: Path | None, previous: dict[str, Any] | None, started: float, dist: Dist
) -> Path:
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)
    else:
        threads, why = default_threads()
        torch.set_num_threads(threads)
        log.info("num_threads: %d (%s; set num_threads to choose)", threads, why)
    device = local_device(resolve_device(recipe.device), dist)
    cache_dir = Path(recipe.data.label_cache) if recipe.data.label_cache else out.resolve().parent / "label-cache"
    prepared = prepare(recipe, cache_dir, device, dist)
    model, info, splits, recipe = prepared.model, prepared.info, prepared.splits, prepared.recipe
    if not dist.is_main:
        return _peer_training(model, recipe, splits, device, out, previous, dist)
    folder = RunFolder(out)
    tracker = make_tracker(recipe, out, recipe_file, (previous or {}).get("wandb_id"))
    run_record = {
        "status": "running",
        **versions(),
        "wandb_id": tracker.run_id,
        "foundation": info.source,
        "num_threads": torch.get_num_threads(),
    }
    if prepared.labelled_files:
        run_record["labelled_files"] = prepared.labelled_files
    folder.write_record(run_record)
    try:
        trains = recipe.training.epochs > 0
        zero_shot = evaluate_all(
            model, splits, recipe, device, None if trains else folder.plots, None if trains else folder.pair_errors
        )
        folder.write_json(folder.zero_shot, zero_shot)
        trainer = Trainer(
            model, recipe, splits.train, splits.valid, device, folder.checkpoints, tracker.log_epoch, dist
        )
        if previous is not None and not trainer.load_checkpoint():
            log.warning("no readable checkpoint in %s; starting from epoch 0", folder.checkpoints)
        run_record["setup_s"] = round(time.perf_counter() - started, 2)
        folder.write_record(run_record)
        log.info("set-up: %.1f s to the first training step", run_record["setup_s"])
        history = trainer.fit() if trains else trainer.history
        folder.write_json(folder.history, history.__dict__)
        metrics = evaluate_all(model, splits, recipe, device, folder.plots, folder.pair_errors) if trains else zero_shot
        folder.write_json(folder.metrics, metrics)
        spec = recipe.export
        metadata = model_metadata(recipe, info, history.best_epoch)
        stock = to_e3nn(model)  # what every file holds, whatever kernels trained it
        files = export_models(
            stock, recipe.export_fidelities, folder.models, spec.multihead, spec.torchscript, spec.lammps, metadata
        )
        md_record = final_md_check(stock, recipe, splits, out)
        forgetting = forgetting_check(stock, recipe, splits, metrics, out)
        wall = time.perf_counter() - started
        write_report(
            out, recipe, info, splits, metrics, zero_shot, history, prepared.e0s, files, wall, md_record, forgetting
        )
        tracker.log_final(out, metrics, files, metadata, forgetting)
    except BaseException as exc:
        # Ctrl-C (SIGINT) or a SIGTERM turned into KeyboardInterrupt: the run can go on with --resume.
        run_record["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        folder.write_record(run_record)
        tracker.finish(failed=True)
        raise
    run_record.update(status="complete", wall_time_s=round(time.perf_counter() - started, 1))
    folder.write_record(run_record)
    tracker.finish()
    log.info("run complete: %s (%.0f s)", out, time.perf_counter() - started)
    return out
