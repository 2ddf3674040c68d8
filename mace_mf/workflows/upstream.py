"""The strongest alternative a user has today: mace-torch's own ``mace_run_train``, run on a recipe.

A recipe's fidelities become upstream *heads* of one ``mace_run_train`` fine-tuning run from the
same local foundation file, on the same geometries and labels that mace_mf trains on
(:func:`mace_mf.data.splits.select_data`: same splits, ``data.max_train`` subset and ``label_fraction``
subsets), with the same batch size, learning rate, epochs, dtype, EMA, scheduler, gradient clipping
and seed. The final model is then scored by mace_mf's own evaluation (``metrics.json`` with the same
layout as a mace_mf run: split → fidelity = upstream head), so ``mace-mf bench`` compares like with
like.

How the recipe maps onto mace-torch 0.3.16 (read from ``mace/cli/run_train.py``,
``mace/tools/arg_parser.py``, ``mace/tools/multihead_tools.py``):

- **Plain fine-tuning with heads** (``--multiheads_finetuning False --heads {...}``), not
  upstream's "multihead fine-tuning". The latter adds a replay ``pt_head`` and, for a foundation
  that is not a Materials-Project model, needs ``--pt_train_file``; it also forces the
  ``universal`` loss, lr 1e-4 and EMA decay 0.99999 (unless ``--force_mh_ft_lr``). The replay head
  guards against forgetting the *foundation's* chemistry, which neither the mace_mf arms nor this
  comparison score; with EMA 0.99999 a few-epoch budget would barely move the weights. Without
  ``--pt_train_file``, upstream itself falls back to exactly this mode for a local foundation.
- **Per-fidelity loss weights**: upstream has one global ``--energy_weight``/``--forces_weight``
  but honours per-configuration ``config_energy_weight``/``config_forces_weight`` in
  ``atoms.info``. Each head gets its own files under ``<out>/upstream/heads/`` whose
  configurations carry the recipe's weights, with global weights 1, so a fidelity's weights are
  exactly the recipe's. Forces a fidelity does not train on are left out of its files (upstream
  then gives them weight 0 and never sees them, which is also how validation selects checkpoints:
  on the labels trained on).
- **Checkpoint selection**: upstream picks the best epoch on the validation loss of the *last*
  head, so the recipe's ``training.target`` is placed last.
- **E0s**: ``fit`` → ``estimated`` (least squares on label − foundation prediction, as mace_mf's
  fit), ``foundation`` → ``foundation``, a mapping → that mapping by atomic number.
- **Foundation**: the recipe's foundation is loaded by mace_mf (old pickles upgraded, the start
  head extracted) and saved in the run's dtype as ``<out>/upstream/foundation.model``; a float32
  file used with ``--default_dtype float64`` otherwise crashes upstream's E0 estimation.
- Not expressible upstream and therefore not applied (recorded in ``run.json``): head coupling
  (``base``/``coupling``, upstream heads are independent), ``base_forces_weight``,
  ``fidelity_embedding``, ``normalise_weights``, ``lr_factors``, ``freeze_backbone_epochs``.
  Upstream's Adam always uses ``amsgrad`` (the flag cannot be switched off).

Timings are read from upstream's own log: set-up (process start to the end of its validation pass
before training), then one wall time per epoch (training plus validation of every head).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers as symbol_to_z

from mace_mf.config.loading import dump_recipe
from mace_mf.config.schema import Recipe, TrainingSpec
from mace_mf.data.table import LabelTable
from mace_mf.errors import RecipeError, RunError
from mace_mf.files import atomic_torch_save, atomic_write_text
from mace_mf.model.build import torch_dtype
from mace_mf.run_folder import RunFolder
from mace_mf.version import versions

log = logging.getLogger(__name__)

UPSTREAM_DIR = "upstream"
RUN_NAME = "mace_mh"
ENERGY_KEY, FORCES_KEY = "REF_energy", "REF_forces"
# mace's logger: "2026-11-28 10:39:17.123 INFO: Epoch 0: head: dft, loss=..."
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \w+: (Initial|Epoch (\d+)): head: (\S+),")


@dataclass
class UpstreamRun:
    """What one ``mace_run_train`` run produced and how long it took."""

    model: Path  # the final (best-epoch) multi-head model, heads named as the fidelities
    command: list[str]  # argv of the subprocess
    log: Path  # its captured stdout/stderr; upstream's own log is in ``logs/`` beside it
    heads: list[str]  # upstream head order (the target last)
    setup_s: float  # process start to the end of the validation pass before training
    epoch_s: list[float]  # per epoch: training plus validation of every head
    wall_s: float  # the whole subprocess
    not_expressed: list[str] = field(default_factory=list)  # recipe settings upstream cannot apply

    @property
    def first_epoch_s(self) -> float | None:
        """The first epoch including set-up: what a user waits for before the first result."""
        return self.setup_s + self.epoch_s[0] if self.epoch_s else None

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(model=str(self.model), log=str(self.log), first_epoch_s=self.first_epoch_s)
        data["command_line"] = shlex.join(self.command)
        return data


def _head_order(recipe: Recipe) -> list[str]:
    """Fidelities in recipe order with the target last (upstream selects on the last head)."""
    names = [n for n in recipe.fidelities if n != recipe.target]
    return [*names, recipe.target]


def not_expressed(recipe: Recipe) -> list[str]:
    """Recipe settings that upstream cannot express, so the upstream arm runs without them."""
    skipped = []
    for name, spec in recipe.fidelities.items():
        if spec.base is not None:
            skipped.append(f"fidelities.{name}.coupling={spec.coupling} (base {spec.base}): heads are independent")
        if spec.base_forces_weight > 0:
            skipped.append(f"fidelities.{name}.base_forces_weight={spec.base_forces_weight}")
    t, default = recipe.training, TrainingSpec()
    for key in ("fidelity_embedding", "normalise_weights", "lr_factors", "freeze_backbone_epochs"):
        if getattr(t, key) != getattr(default, key):
            skipped.append(f"training.{key}={getattr(t, key)}")
    return skipped


def _head_atoms(
    table: LabelTable, position: int, h: int, forces_key: str | None, energy_weight: float, forces_weight: float
) -> Atoms | None:
    """One configuration as upstream reads it for fidelity ``h``; None if it has no trained label."""
    energy = float(table.energies[position, h]) if energy_weight > 0 and table.energy_mask[position, h] else None
    with_forces = forces_weight > 0 and forces_key is not None and bool(table.forces_mask[position, h])
    if energy is None and not with_forces:
        return None
    record = table.configs.record(int(table.rows[position]), (), [forces_key] if with_forces else [])
    atoms = Atoms(numbers=record.numbers, positions=record.positions, cell=record.cell, pbc=record.pbc)
    if energy is not None:
        atoms.info[ENERGY_KEY] = energy
        atoms.info["config_energy_weight"] = energy_weight
    if with_forces:
        atoms.arrays[FORCES_KEY] = np.asarray(record.arrays[forces_key], dtype=float)
        atoms.info["config_forces_weight"] = forces_weight
    return atoms


def _e0s_flag(recipe: Recipe, name: str, foundation: torch.nn.Module) -> str:
    spec = recipe.fidelities[name].e0s
    if spec == "fit":
        return "estimated"
    if spec == "foundation":
        return "foundation"
    zs = [int(z) for z in foundation.atomic_numbers]
    base = torch.atleast_2d(foundation.atomic_energies_fn.atomic_energies)[0].detach().double().tolist()
    values = dict(zip(zs, base, strict=True))
    for symbol, value in spec.items():
        z = symbol_to_z.get(symbol)
        if z is None or z not in values:
            raise RecipeError(f"fidelities.{name}.e0s: {symbol!r} is not an element of the foundation")
        values[z] = float(value)
    return repr(values)


def write_head_files(
    recipe: Recipe, train: LabelTable, valid: LabelTable, folder: Path, foundation: torch.nn.Module
) -> dict[str, dict[str, Any]]:
    """Per-fidelity train/valid files and the ``--heads`` dictionary that points at them."""
    folder.mkdir(parents=True, exist_ok=True)
    fidelities = list(recipe.fidelities)
    heads: dict[str, dict[str, Any]] = {}
    for name in _head_order(recipe):
        h, spec = fidelities.index(name), recipe.fidelities[name]
        files = {}
        for split, table in (("train", train), ("valid", valid)):
            candidates = (
                _head_atoms(table, p, h, spec.forces_key, spec.energy_weight, spec.forces_weight)
                for p in range(len(table))
            )
            atoms = [a for a in candidates if a is not None]
            if not atoms:
                raise RecipeError(
                    f"fidelities.{name}: no {split} configuration carries a label trained on (weights "
                    f"{spec.energy_weight}/{spec.forces_weight}); upstream needs {split} data for every head"
                )
            path = folder / f"{name}_{split}.xyz"
            tmp = path.with_suffix(".tmp.xyz")
            ase.io.write(tmp, atoms, format="extxyz")
            tmp.replace(path)
            files[f"{split}_file"] = str(path.resolve())
        heads[name] = {
            **files,
            "E0s": _e0s_flag(recipe, name, foundation),
            "energy_key": ENERGY_KEY,
            "forces_key": FORCES_KEY,
        }
    return heads


def upstream_command(
    recipe: Recipe, work: Path, foundation_file: Path, heads: dict[str, Any], epochs: int
) -> list[str]:
    """The ``mace_run_train`` command line for a recipe (``python -m mace.cli.run_train``)."""
    t = recipe.training
    flags: dict[str, Any] = {
        "name": RUN_NAME,
        "seed": recipe.seed,
        "work_dir": work,
        "model_dir": work,
        "log_dir": work / "logs",
        "checkpoints_dir": work / "checkpoints",
        "results_dir": work / "results",
        "device": recipe.device.split(":")[0],
        "default_dtype": recipe.dtype,
        "foundation_model": foundation_file,
        "multiheads_finetuning": False,
        "heads": json.dumps(heads),  # a dict literal (upstream reads it with ast.literal_eval)
        "loss": "weighted",
        "energy_weight": 1.0,
        "forces_weight": 1.0,
        "optimizer": t.optimizer,
        "weight_decay": t.weight_decay,
        "lr": t.lr,
        "batch_size": t.batch_size,
        "valid_batch_size": t.eval_batch_size,
        "max_num_epochs": epochs,
        "scheduler": "ReduceLROnPlateau",
        "lr_factor": t.scheduler_factor,
        "scheduler_patience": t.scheduler_patience,
        "patience": t.early_stopping_patience or max(epochs, 1) + 1,
        "clip_grad": t.clip_grad_norm if t.clip_grad_norm is not None else "None",
        "eval_interval": 1,
        "skip_evaluate_heads": ",".join(heads),  # mace_mf scores the model; skip upstream's tables
    }
    if t.ema_decay is not None:
        flags["ema_decay"] = t.ema_decay
    command = [sys.executable, "-m", "mace.cli.run_train"]
    for key, value in flags.items():
        command.append(f"--{key}={value}")
    command.append("--save_cpu")  # store_true flags take no value
    if t.ema_decay is not None:
        command.append("--ema")
    return command


def parse_timings(log_text: str, last_head: str, started: datetime) -> tuple[float, list[float]]:
    """(set-up seconds, per-epoch seconds) from upstream's log.

    Set-up ends with the last head's validation before training ("Initial"); epoch k ends with the
    last head's validation after it, so an epoch is training plus validation of every head.
    """
    marks: dict[int, datetime] = {}
    initial: datetime | None = None
    for line in log_text.splitlines():
        match = _LOG_LINE.match(line)
        if match is None or match.group(4) != last_head:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f")
        if match.group(2) == "Initial":
            initial = stamp
        else:
            marks[int(match.group(3))] = stamp
    if initial is None:
        return float("nan"), []
    ends = [initial, *(marks[k] for k in sorted(marks))]
    epochs = [(b - a).total_seconds() for a, b in pairwise(ends)]
    return (initial - started).total_seconds(), epochs


def _tail(path: Path, lines: int = 40) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _failure_reason(output: Path) -> str:
    """The most telling line of a failed upstream run: its exception, else its last line."""
    tail = [line.strip() for line in _tail(output) if line.strip()]
    for line in reversed(tail):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line[:200]
    return tail[-1][:200] if tail else "no output"


def run_upstream(recipe: Recipe, out_dir: Path, *, epochs: int | None = None, overwrite: bool = False) -> UpstreamRun:
    """Run ``mace_run_train`` for ``recipe`` in ``out_dir/upstream``; return its model and timings.

    ``epochs`` overrides ``training.epochs`` (the speed benchmark times a few). The recipe's data
    files must already hold every label (``upstream_arm`` computes ``labels:`` fidelities first). An
    existing upstream folder is refused unless ``overwrite`` (an unfinished run is restarted, not
    resumed: its timings would not be comparable).
    """
    from mace_mf.data.splits import select_data
    from mace_mf.model.foundation import load_foundation
    from mace_mf.model.heads import extract_head

    work = (Path(out_dir) / UPSTREAM_DIR).resolve()
    if work.exists() and any(work.iterdir()):
        if not overwrite:
            raise RunError(f"{work}: already holds an upstream run; choose another folder or remove it")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    epochs = recipe.training.epochs if epochs is None else epochs
    if epochs < 1:
        raise RecipeError("training.epochs: the upstream arm needs at least 1 epoch (mace_run_train trains)")
    dtype = torch_dtype(recipe.dtype)
    foundation, info = load_foundation(recipe.foundation.model, recipe.foundation.head, dtype)
    single = extract_head(foundation, info.head)
    foundation_file = work / "foundation.model"
    atomic_torch_save(single, foundation_file)
    selected = select_data(recipe, info, single)
    heads = write_head_files(recipe, selected.train, selected.valid, work / "heads", single)
    del foundation, single
    command = upstream_command(recipe, work, foundation_file, heads, epochs)
    atomic_write_text(work / "command.sh", shlex.join(command) + "\n")
    skipped = not_expressed(recipe)
    for item in skipped:
        log.info("upstream arm: not expressible in mace_run_train, not applied: %s", item)
    env = dict(os.environ)
    if recipe.num_threads is not None:
        env.update(OMP_NUM_THREADS=str(recipe.num_threads), MKL_NUM_THREADS=str(recipe.num_threads))
    output = work / "mace_run_train.out"
    log.info("upstream: %s (log %s)", shlex.join(command[:3]), output)
    started_at = datetime.now()
    start = time.perf_counter()
    with output.open("w") as stream:
        code = subprocess.run(
            command, cwd=work, env=env, stdout=stream, stderr=subprocess.STDOUT, check=False
        ).returncode
    wall = time.perf_counter() - start
    model = work / f"{RUN_NAME}.model"
    if code != 0 or not model.is_file():
        raise RunError(f"mace_run_train failed (exit {code}): {_failure_reason(output)}; full log: {output}")
    log_file = work / "logs" / f"{RUN_NAME}_run-{recipe.seed}.log"
    text = log_file.read_text(errors="replace") if log_file.is_file() else output.read_text(errors="replace")
    setup, per_epoch = parse_timings(text, _head_order(recipe)[-1], started_at)
    return UpstreamRun(model, command, output, list(heads), setup, per_epoch, wall, skipped)


def score_upstream(recipe: Recipe, model_file: Path, out_dir: Path) -> dict[str, Any]:
    """Score an upstream model with mace_mf's evaluation; write ``metrics.json``, return it.

    Each recipe fidelity is read from the upstream head of the same name; graphs are built with
    the upstream model's own element table (upstream keeps only the elements of the data).
    """
    from mace_mf.data.splits import load_splits
    from mace_mf.evaluation.metrics import compute_metrics
    from mace_mf.evaluation.pairs import score_pairs
    from mace_mf.evaluation.predict import predict
    from mace_mf.model.build import resolve_device
    from mace_mf.model.foundation import load_foundation

    folder = RunFolder(out_dir)
    dtype = torch_dtype(recipe.dtype)
    device = resolve_device(recipe.device)
    model, info = load_foundation(str(model_file), None, dtype, any_head=True)
    missing = [f for f in recipe.fidelities if f not in info.heads]
    if missing:
        raise RunError(f"{model_file}: upstream model has heads {list(info.heads)}, not {missing}")
    model = model.to(device)
    columns = [list(info.heads).index(f) for f in recipe.fidelities]
    splits = load_splits(recipe, info, dtype)
    metrics = {
        name: compute_metrics(split, predict(model, split, columns, recipe.training.eval_batch_size, device))
        for name, split in splits.named().items()
    }
    if splits.pairs is not None:
        batch = recipe.training.eval_batch_size
        record = score_pairs(model, splits.pairs, columns, list(recipe.fidelities), metrics["valid"], device, batch)
        folder.write_json(folder.pair_errors, record)
    folder.write_json(folder.metrics, metrics)
    return metrics


def upstream_arm(recipe: Recipe, out: Path) -> Path:
    """The ``mace-mh`` benchmark arm: train upstream, score it, record ``run.json`` like a run."""
    from mace_mf.labels.labelling import label_recipe_data

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)
    cache_dir = Path(recipe.data.label_cache) if recipe.data.label_cache else out.resolve().parent / "label-cache"
    data_recipe, _ = label_recipe_data(recipe, cache_dir)
    record: dict[str, Any] = {
        "status": "running",
        "runner": "mace_run_train",
        **versions(),
        "foundation": recipe.foundation.model,
    }
    folder = RunFolder(out)
    folder.write_record(record)
    atomic_write_text(folder.resolved_recipe, dump_recipe(recipe))
    try:
        run = run_upstream(data_recipe, out, overwrite=True)
        score_upstream(data_recipe, run.model, out)
    except BaseException:
        record["status"] = "failed"
        folder.write_record(record)
        raise
    record.update(status="complete", wall_time_s=round(time.perf_counter() - started, 1), upstream=run.record())
    folder.write_record(record)
    log.info(
        "upstream run complete: %s (set-up %.0f s, epochs %s s)",
        out,
        run.setup_s,
        ", ".join(f"{t:.0f}" for t in run.epoch_s),
    )
    return out
