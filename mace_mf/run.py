"""One training run, end to end, in the order data flows:

recipe → foundation → labels → data → fidelity heads (+E0) → train → evaluate → export → report.

"labels" computes the fidelities a recipe declares with ``labels:`` (mace_mf.labelling), into a
cache shared by runs; the data are then read from the labelled copies, while the recipe written to
the run folder keeps the original paths.

The run folder is owned by one run: an existing run is never overwritten unless asked
(``overwrite``) and an interrupted one continues from its last checkpoint (``resume``).

Under ``torchrun`` every process runs :func:`train_run`: rank 0 claims the folder and tells the
others how it went, every rank builds the same model and data and trains its shard, and rank 0
alone evaluates, exports, reports and tracks (mace_mf.distributed).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from ase.data import atomic_numbers as symbol_to_z
from ase.data import chemical_symbols
from mace.tools import AtomicNumberTable

from mace_mf.coupling import apply_couplings
from mace_mf.data import (
    Chooser,
    Frame,
    Split,
    check_declared_keys,
    make_split,
    read_frames,
    split_off,
    subsample_labels,
)
from mace_mf.distributed import Dist, broadcast, local_batch_size, local_device, rank0_first, session
from mace_mf.errors import RecipeError, RunError, UserError
from mace_mf.evaluate import compute_metrics, parity_plot, predict
from mace_mf.export import export_models
from mace_mf.files import atomic_write_text
from mace_mf.foundation import FoundationInfo, check_elements, keep_elements, load_foundation
from mace_mf.heads import add_fidelity_embedding, extract_head, fit_e0s, replicate_head, set_head_e0s
from mace_mf.inference import load_model_file
from mace_mf.labelling import label_recipe_data
from mace_mf.md_check import MDCheckOptions, md_check, write_md_check
from mace_mf.pairs import Pairs, read_pairs, score_pairs
from mace_mf.recipe import Recipe, dump_recipe, recipe_changes, recipe_from_dict
from mace_mf.report import write_report
from mace_mf.select import select
from mace_mf.tracking import make_tracker
from mace_mf.train import Trainer

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RESOLVED_FILE = "recipe.resolved.yaml"
PAIR_ERRORS_FILE = "pair_errors.json"


def default_out(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_out(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Claim the output folder; return the earlier run's record when resuming."""
    record_path = out / RUN_FILE
    has_run = record_path.is_file() or (out / "checkpoints").is_dir()
    if resume:
        if not has_run:
            raise RunError(f"{out}: no run to resume here; drop --resume to start a new run")
        return json.loads(record_path.read_text()) if record_path.is_file() else {}
    if has_run and not overwrite:
        raise RunError(
            f"{out}: already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    if has_run:
        for name in ("checkpoints", "models", "plots", "wandb"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (
            RUN_FILE,
            "metrics.json",
            "zero_shot_metrics.json",
            "report.md",
            RESOLVED_FILE,
            "history.json",
            "train.log",
            "md_check.json",
            PAIR_ERRORS_FILE,
        ):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


@dataclass
class Splits:
    train: Split
    valid: Split
    test: Split | None
    pairs: Pairs | None = None  # displacement pairs of validation geometries, scored with valid

    def named(self) -> dict[str, Split]:
        result = {"train": self.train, "valid": self.valid}
        if self.test is not None:
            result["test"] = self.test
        return result


Frames = tuple[list[Frame], list[Frame], list[Frame] | None]


def select_frames(recipe: Recipe, info: FoundationInfo, foundation: torch.nn.Module | None = None) -> Frames:
    """Read, check and split the data into (train, valid, test) frames, label subsets applied.

    The one definition of which geometries and labels a recipe trains, selects and scores on;
    the upstream comparison arm (mace_mf.upstream) writes its files from it. ``foundation`` (its
    starting head) chooses the geometries of a ``label_selection`` other than ``random``.
    """
    specs = recipe.fidelities
    d = recipe.data
    train = read_frames(d.train, specs, d.format)
    # Fractions are of the whole training file, so test and valid sizes do not depend on each other.
    total = len(train)
    test: list[Frame] | None = None
    if d.test is not None:
        test = read_frames(d.test, specs, d.format)
    elif d.test_fraction > 0:
        train, test = split_off(train, max(1, round(d.test_fraction * total)), recipe.seed, salt=2)
    if d.valid is not None:
        valid = read_frames(d.valid, specs, d.format)
    else:
        if d.valid_fraction <= 0:
            raise RecipeError("data.valid: no validation file and data.valid_fraction is 0; give one of them")
        train, valid = split_off(train, max(1, round(d.valid_fraction * total)), recipe.seed, salt=1)
    if not train:
        raise RecipeError("data: valid_fraction + test_fraction leave no training configurations; lower them")
    check_declared_keys(train, specs, "data.train", [*valid, *(test or [])])
    if d.max_train is not None and len(train) > d.max_train:
        train, _ = split_off(train, len(train) - d.max_train, recipe.seed, salt=3)
    for name, frames in (("data.train", train), ("data.valid", valid), ("data.test", test or [])):
        zs = {int(z) for f in frames for z in f.atoms.numbers}
        check_elements(info, zs, name)
    subsample_labels(train, specs, recipe.seed, label_chooser(recipe, train, foundation))
    target = recipe.target
    t = list(specs).index(target)
    if not any(f.labels.energy[t] is not None or f.labels.forces[t] is not None for f in valid):
        raise RecipeError(
            f"training.target: fidelity {target!r} has no labels in the validation data; "
            "label it there or choose another target"
        )
    return train, valid, test


def label_chooser(recipe: Recipe, train: list[Frame], model: torch.nn.Module | None) -> Chooser | None:
    """The chooser of mace_mf.select for ``label_selection`` (fps, kmeans, disagreement) with ``model``."""
    if model is None:
        return None
    names = list(recipe.fidelities)

    def choose(h: int, labelled: list[int], count: int) -> list[int]:
        spec = recipe.fidelities[names[h]]
        low_forces = None
        if spec.label_selection == "disagreement":
            low = spec.base or next((n for n in names if n != names[h] and recipe.fidelities[n].forces_key), None)
            if low is None:
                raise RecipeError(
                    f"fidelities.{names[h]}.label_selection: disagreement needs a base fidelity with forces"
                )
            low_forces = [train[i].labels.forces[names.index(low)] for i in labelled]
        atoms = [train[i].atoms for i in labelled]
        picked = select(atoms, count, spec.label_selection, recipe.seed, model, low_forces)
        log.info(
            "fidelities.%s: %s chose %d of %d training geometries", names[h], spec.label_selection, count, len(labelled)
        )
        return [labelled[i] for i in picked]

    return choose


def data_elements(info: FoundationInfo, frames: Frames) -> tuple[int, ...]:
    """The foundation's elements that occur in any split, in the foundation's order."""
    seen = {int(z) for split in frames if split for f in split for z in f.atoms.numbers}
    return tuple(z for z in info.atomic_numbers if z in seen)


def load_splits(recipe: Recipe, info: FoundationInfo, dtype: torch.dtype, frames: Frames | None = None) -> Splits:
    """Read, check and split the data (unless ``frames`` are given); build graphs once for the run."""
    specs = recipe.fidelities
    train, valid, test = frames or select_frames(recipe, info)
    z_table = AtomicNumberTable(list(info.atomic_numbers))
    heads = list(specs)
    pairs = None
    if recipe.data.valid_pairs is not None:
        pairs = read_pairs(recipe.data.valid_pairs, specs, recipe.data.format)
        check_elements(info, {int(z) for a in pairs.centres for z in a.numbers}, "data.valid_pairs")
        if not np.isfinite(pairs.reference).any():
            keys = ", ".join(f"{s.energy_key}" for s in specs.values() if s.energy_key)
            raise RecipeError(
                f"data.valid_pairs: no pair carries energies of a fidelity ({keys}) on both halves; "
                "label them with mace-mf label --energies-only"
            )
    return Splits(
        make_split("train", train, heads, z_table, info.r_max, dtype),
        make_split("valid", valid, heads, z_table, info.r_max, dtype),
        make_split("test", test, heads, z_table, info.r_max, dtype) if test else None,
        pairs,
    )


def start_head(
    recipe: Recipe, foundation: torch.nn.Module, info: FoundationInfo, dtype: torch.dtype
) -> tuple[torch.nn.Module, FoundationInfo, Splits]:
    """The foundation's starting head (restricted to the data's elements unless
    ``foundation.elements: all``), the info that describes it, and the splits built for it.
    ``recipe`` is the one whose data files are read (after on-the-fly labelling)."""
    single = extract_head(foundation, info.head)
    frames = select_frames(recipe, info, single)
    kept = data_elements(info, frames)
    if recipe.foundation.elements == "data" and kept != info.atomic_numbers:
        single = keep_elements(single, info, list(kept))
        log.info(
            "foundation.elements: data: kept %s of %d elements (%d parameters)",
            " ".join(chemical_symbols[z] for z in kept),
            len(info.atomic_numbers),
            sum(p.numel() for p in single.parameters()),
        )
        info = replace(info, atomic_numbers=kept)
    return single, info, load_splits(recipe, info, dtype, frames)


def assign_e0s(
    model: torch.nn.Module, foundation_single: torch.nn.Module, recipe: Recipe, train: Split, device: torch.device
) -> dict[str, dict[str, float]]:
    """Set each head's E0s as the recipe says; return them by fidelity and element.

    A fitted head with a ``base`` fidelity fitted before it starts from the base's E0s rather than
    the foundation's: where its own compositions cannot resolve every element (a few high-level
    energies, e.g. 8 geometries of 3 compositions for 4 elements), the unresolved directions keep
    the base level's E0s, which are a level of theory near it, instead of the foundation's, which
    can be hundreds of eV per atom away (measured: QZVP test energies off by 265 eV/atom).
    """
    zs = [int(z) for z in model.atomic_numbers]
    base = torch.atleast_2d(foundation_single.atomic_energies_fn.atomic_energies)[0].detach().cpu().double().numpy()
    z_table = AtomicNumberTable(zs)
    counts = train.counts(z_table)
    labels, mask = train.energies(), train.energy_mask()
    foundation_energy: np.ndarray | None = None
    result: dict[str, dict[str, float]] = {}
    fitted: dict[str, np.ndarray] = {}
    for h, (name, spec) in enumerate(recipe.fidelities.items()):
        if spec.e0s == "fit" and mask[:, h].any():
            if foundation_energy is None:
                foundation_energy = predict(
                    foundation_single.to(device), _without_forces(train), [0], recipe.training.eval_batch_size, device
                ).energies[:, 0]
            sel = mask[:, h]
            prior = fitted.get(spec.base or "", base)
            residual = labels[sel, h] - foundation_energy[sel] - counts[sel] @ (prior - base)
            e0 = fit_e0s(counts[sel], residual, prior)
            fitted[name] = e0
        elif isinstance(spec.e0s, dict):
            e0 = base.copy()
            present = {zs[i] for i in np.flatnonzero(counts.sum(0) > 0)}
            for symbol, value in spec.e0s.items():
                z = symbol_to_z.get(symbol)
                if z is None or z not in zs:
                    raise RecipeError(f"fidelities.{name}.e0s: {symbol!r} is not an element of the foundation")
                e0[zs.index(z)] = value
                present.discard(z)
            if present:
                missing = ", ".join(chemical_symbols[z] for z in sorted(present))
                raise RecipeError(f"fidelities.{name}.e0s: no value for {missing}, which the data contains")
        else:
            e0 = base
        set_head_e0s(model, h, e0)
        result[name] = {chemical_symbols[z]: float(v) for z, v in zip(zs, e0, strict=True)}
    return result


def _without_forces(split: Split) -> Split:
    """A view of a split whose force masks are zero (energy-only prediction is cheaper)."""
    graphs = []
    for g in split.graphs:
        clone = copy.copy(g)
        clone.mf_forces_mask = torch.zeros_like(g.mf_forces_mask)
        graphs.append(clone)
    return Split(split.name, split.fidelities, split.atoms, graphs)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device: {name!r} requested but CUDA is not available; set device: cpu")
    return device


def evaluate_all(
    model: torch.nn.Module,
    splits: Splits,
    recipe: Recipe,
    device: torch.device,
    plots: Path | None,
    pair_errors: Path | None = None,
) -> dict[str, Any]:
    """Metrics of every split (and of the validation pairs, into ``valid``); parity plots into
    ``plots`` and the per-pair errors into ``pair_errors`` when given."""
    heads = list(range(len(recipe.fidelities)))
    metrics: dict[str, Any] = {}
    for name, split in splits.named().items():
        pred = predict(model, split, heads, recipe.training.eval_batch_size, device)
        metrics[name] = compute_metrics(split, pred)
        if plots is not None and name != "train":
            for h, fidelity in enumerate(recipe.fidelities):
                parity_plot(split, pred, h, plots / f"parity_{name}_{fidelity}.png")
    if splits.pairs is not None:
        record = score_pairs(
            model,
            splits.pairs,
            heads,
            list(recipe.fidelities),
            metrics["valid"],
            device,
            recipe.training.eval_batch_size,
        )
        if pair_errors is not None:
            atomic_write_text(pair_errors, json.dumps(record, indent=2))
    return metrics


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
    exported = out / "models" / f"{recipe.target}.model"
    if exported.is_file():
        candidate, source = load_model_file(exported), str(exported.relative_to(out))
    else:
        candidate, source = extract_head(model, recipe.target), f"head {recipe.target} (not exported)"
    options = MDCheckOptions(
        steps=spec.steps,
        dt_fs=spec.dt_fs,
        temperature_K=spec.temperature_K,
        seed=recipe.seed,
        max_drift=spec.max_drift,
        max_bond_stretch=spec.max_bond_stretch,
        max_force=spec.max_force,
    )
    record = md_check(candidate, split.atoms[: spec.structures], None, options, source)
    record["structures_file"] = f"{split.name} split, first {min(spec.structures, len(split))}"
    write_md_check(record, out / "md_check.json")
    (log.info if record["passed"] else log.warning)("%s", record["summary"])
    return record


def train_run(
    recipe: Recipe, out: Path, recipe_file: Path | None = None, resume: bool = False, overwrite: bool = False
) -> Path:
    """Run a recipe into ``out``; return ``out``.

    Under torchrun (``WORLD_SIZE`` > 1) each process calls this; only rank 0 writes into ``out``.
    """
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
    if resume and (changes := changes_from_saved(out, recipe)):
        raise RunError(
            f"{out / RESOLVED_FILE}: the recipe differs from the run being resumed ({changes}); "
            "resume with the same recipe and --set options, or start a new --out"
        )
    atomic_write_text(out / RESOLVED_FILE, dump_recipe(recipe))
    return previous


def changes_from_saved(out: Path, recipe: Recipe) -> str:
    """How ``recipe`` differs from the resolved recipe saved in run folder ``out`` (its first three
    changed keys, ``key: old -> new``); empty when they are equal or nothing is saved."""
    resolved = out / RESOLVED_FILE
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
    file_handler = logging.FileHandler(out / "train.log")
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
        rejected = not (out / RUN_FILE).is_file()  # refused before the run began
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
    trainer = Trainer(model, recipe, splits.train, splits.valid, device, out / "checkpoints", None, dist)
    if previous is not None:
        trainer.load_checkpoint()
    if recipe.training.epochs > 0:
        trainer.fit()
    return out


def _unclaim(out: Path, fresh: bool) -> None:
    """Input rejected before anything ran: leave no folder that could pass for a run."""
    for name in (RESOLVED_FILE, "train.log"):
        (out / name).unlink(missing_ok=True)
    if fresh and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _train_run(
    recipe: Recipe, out: Path, recipe_file: Path | None, previous: dict[str, Any] | None, started: float, dist: Dist
) -> Path:
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)
    dtype = torch.float64 if recipe.dtype == "float64" else torch.float32
    device = local_device(resolve_device(recipe.device), dist)
    with rank0_first(dist):  # a named foundation is downloaded once
        foundation, info = load_foundation(recipe.foundation.model, recipe.foundation.head, dtype)
    log.info(
        "foundation %s: %d parameters, r_max %.2f Å, elements %s",
        info.source,
        info.num_parameters,
        info.r_max,
        " ".join(info.elements),
    )
    cache_dir = Path(recipe.data.label_cache) if recipe.data.label_cache else out.resolve().parent / "label-cache"
    with rank0_first(dist):  # rank 0 labels into the cache, the others read it
        data_recipe, labelled_files = label_recipe_data(recipe, cache_dir)
    single, info, splits = start_head(data_recipe, foundation, info, dtype)
    log.info(
        "data: %d train, %d valid, %d test configurations",
        len(splits.train),
        len(splits.valid),
        len(splits.test) if splits.test else 0,
    )
    model = replicate_head(single, list(recipe.fidelities)).to(device)
    apply_couplings(model, recipe)
    if recipe.training.fidelity_embedding:
        add_fidelity_embedding(model)
    e0s = assign_e0s(model, single, recipe, splits.train, device)
    del foundation, single
    if not dist.is_main:
        return _peer_training(model, recipe, splits, device, out, previous, dist)
    tracker = make_tracker(recipe, out, recipe_file, (previous or {}).get("wandb_id"))
    run_record = {
        "status": "running",
        "mace_mf": version("mace-mf"),
        "mace_torch": version("mace-torch"),
        "torch": torch.__version__,
        "wandb_id": tracker.run_id,
        "foundation": info.source,
    }
    if labelled_files:
        run_record["labelled_files"] = labelled_files
    atomic_write_text(out / RUN_FILE, json.dumps(run_record, indent=2))
    try:
        trains = recipe.training.epochs > 0
        zero_shot = evaluate_all(
            model, splits, recipe, device, None if trains else out / "plots", None if trains else out / PAIR_ERRORS_FILE
        )
        atomic_write_text(out / "zero_shot_metrics.json", json.dumps(zero_shot, indent=2))
        trainer = Trainer(
            model, recipe, splits.train, splits.valid, device, out / "checkpoints", tracker.log_epoch, dist
        )
        if previous is not None and not trainer.load_checkpoint():
            log.warning("no readable checkpoint in %s; starting from epoch 0", out / "checkpoints")
        history = trainer.fit() if trains else trainer.history
        atomic_write_text(out / "history.json", json.dumps(history.__dict__, indent=2))
        metrics = (
            evaluate_all(model, splits, recipe, device, out / "plots", out / PAIR_ERRORS_FILE) if trains else zero_shot
        )
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        spec = recipe.export
        files = export_models(
            model, recipe.export_fidelities, out / "models", spec.multihead, spec.torchscript, spec.lammps
        )
        md_record = final_md_check(model, recipe, splits, out)
        wall = time.perf_counter() - started
        write_report(out, recipe, info, splits, metrics, zero_shot, history, e0s, files, wall, md_record)
        tracker.log_final(out, metrics, files, model_metadata(recipe, info, history.best_epoch))
    except BaseException:
        run_record["status"] = "failed"
        atomic_write_text(out / RUN_FILE, json.dumps(run_record, indent=2))
        tracker.finish(failed=True)
        raise
    run_record.update(status="complete", wall_time_s=round(time.perf_counter() - started, 1))
    atomic_write_text(out / RUN_FILE, json.dumps(run_record, indent=2))
    tracker.finish()
    log.info("run complete: %s (%.0f s)", out, time.perf_counter() - started)
    return out
