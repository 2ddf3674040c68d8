"""The training loop: parameter groups, warm-up freezing, EMA, checkpoints and resume.

Every epoch ends with an atomically written checkpoint holding everything needed to continue
bit-for-bit (model, optimizer, scheduler, EMA, best weights, history); shuffling is a pure function
of ``(seed, epoch)``, so a resumed run on CPU repeats the uninterrupted one exactly.

One step's forward (energies of every head from one backbone pass, forces by autograd, the loss
and the coupling penalty) is :class:`TrainingStep`, an ``nn.Module``: under ``torchrun`` it is
what ``DistributedDataParallel`` wraps, so DDP's hooks see the whole forward (mace_mf.train.distributed).
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader

from mace_mf.config.schema import Recipe
from mace_mf.data.graphs import Split, batch_dict
from mace_mf.data.splits import replay_only, statistics_sample
from mace_mf.errors import RunError
from mace_mf.evaluation.metrics import compute_metrics
from mace_mf.evaluation.predict import merge_predictions, predict
from mace_mf.model.coupling import HeadCoupling, coupling_penalty, couplings
from mace_mf.model.forward import fidelity_energies, routed_forces
from mace_mf.train.checkpoint import Checkpoints
from mace_mf.train.distributed import (
    SINGLE,
    Dist,
    all_gather,
    all_reduce_sum,
    shard_bounds,
)
from mace_mf.train.loss import Weights, multi_fidelity_loss, term_counts, term_keys
from mace_mf.train.optim import make_optimiser, set_backbone_frozen

log = logging.getLogger(__name__)

TERM_NAMES = {"e": "e_mse", "f": "f_mse", "p": "f_prior_mse"}


@dataclass
class History:
    """Per-epoch records and the best epoch so far."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_loss: float = math.inf
    bad_epochs: int = 0


def _weighted_valid_loss(m: dict[str, Any], energy_weight: float, forces_weight: float) -> float:
    loss = 0.0
    if m["e_rmse_meV_atom"] is not None and energy_weight > 0:
        loss += energy_weight * (m["e_rmse_meV_atom"] / 1000.0) ** 2
    if m["f_rmse_meV_A"] is not None and forces_weight > 0:
        loss += forces_weight * (m["f_rmse_meV_A"] / 1000.0) ** 2
    return loss


def target_valid_loss(metrics: dict[str, dict[str, Any]], recipe: Recipe) -> float:
    """The validation loss that selects checkpoints, in the training loss's units (eV², eV²/Å²):
    every fidelity's weighted terms (``training.select_on: all``), or the target fidelity's alone
    (``target``; unless it has no weighted term, which would make every epoch equally good and keep
    the first)."""
    target = recipe.fidelities[recipe.target]
    weighted = target.energy_weight > 0 or target.forces_weight > 0
    names = [recipe.target] if recipe.training.select_on == "target" and weighted else list(recipe.fidelities)
    return sum(
        _weighted_valid_loss(metrics[n], recipe.fidelities[n].energy_weight, recipe.fidelities[n].forces_weight)
        for n in names
    )


class TrainingStep(torch.nn.Module):
    """One step's forward: ``(data loss, its terms, coupling penalty or None)`` for a batch.

    The coupling penalty reads parameters only, but it is computed here, inside the forward, so that
    under DDP it is part of the graph whose backward DDP synchronises; every process adds the same
    penalty, and DDP's average of it is the penalty's gradient (the data loss is scaled instead).
    """

    def __init__(self, model: torch.nn.Module, weights: Weights, heads: list[int], coupled: list[HeadCoupling]) -> None:
        super().__init__()
        self.model = model
        self.weights, self.heads, self.coupled = weights, heads, coupled

    def forward(
        self, data: dict[str, torch.Tensor], counts: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        energies = fidelity_energies(self.model, data, self.heads)
        need = self.weights.force_need(data["mf_forces_mask"])
        forces = routed_forces(energies, data["positions"], data["batch"], need, create_graph=True)
        loss, terms = multi_fidelity_loss(energies, forces, data, self.weights, counts)
        return loss, terms, coupling_penalty(self.model, self.coupled)


def _ddp_buffer_option() -> dict[str, bool]:
    """Buffers (E0s, scale/shift, e3nn constants) never change in training: sync them at start only."""
    accepted = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in accepted else {"broadcast_buffers": False}


class Trainer:
    """Fine-tunes a multi-head model on one training split, validating on another."""

    def __init__(
        self,
        model: torch.nn.Module,
        recipe: Recipe,
        train: Split,
        valid: Split,
        device: torch.device,
        checkpoint_dir: Path,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        dist: Dist = SINGLE,
    ) -> None:
        self.model, self.recipe, self.train, self.valid = model, recipe, train, valid
        self.device = device
        self.dist = dist
        self.checkpoints = Checkpoints(checkpoint_dir)
        self.on_epoch = on_epoch
        t = recipe.training
        specs = list(recipe.fidelities.values())
        names = list(recipe.fidelities)
        e_scale, f_scale = np.ones(len(specs)), np.ones(len(specs))
        if t.normalise_weights:
            e_var, f_var = statistics_sample(train, recipe, "the label variances").label_variances()
            e_scale = 1.0 / np.maximum(np.nan_to_num(e_var, nan=1.0), 1e-12)
            f_scale = 1.0 / np.maximum(np.nan_to_num(f_var, nan=1.0), 1e-12)
            log.info(
                "loss weights normalised by label variance: %s",
                ", ".join(f"{n} E×{e:.3g} F×{f:.3g}" for n, e, f in zip(names, e_scale, f_scale, strict=True)),
            )
        self.weights = Weights(
            tuple(float(s.energy_weight * e) for s, e in zip(specs, e_scale, strict=True)),
            tuple(float(s.forces_weight * f) for s, f in zip(specs, f_scale, strict=True)),
            tuple(names.index(s.base) if s.base is not None else None for s in specs),
            tuple(
                float(s.base_forces_weight * (f_scale[names.index(s.base)] if s.base is not None else 1.0))
                for s in specs
            ),
        )
        self.coupled = couplings(recipe)
        self.heads = list(range(len(specs)))
        self.step = TrainingStep(model, self.weights, self.heads, self.coupled)
        self.term_keys = term_keys(self.weights)
        self._ddp: torch.nn.Module | None = None
        self._loader: DataLoader | None = None
        self._ddp_trainable: tuple[bool, ...] = ()
        self.optimizer, self.scheduler, self.ema = make_optimiser(model, t)
        self.history = History()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.start_epoch = 0

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "seed": self.recipe.seed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "best_state": self.best_state,
            "history": self.history.__dict__,
            # Shuffling is seeded by (seed, epoch) and nothing else draws random numbers today; the
            # generators are saved anyway so that anything stochastic added later resumes exactly.
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def save_checkpoint(self, epoch: int) -> Path:
        """The state after ``epoch``, written atomically (rank 0 only)."""
        if not self.dist.is_main:
            return self.checkpoints.path(epoch)
        return self.checkpoints.save(self._checkpoint(), epoch)

    def load_checkpoint(self) -> bool:
        """Restore the newest complete checkpoint (falling back to the one before); False if none."""
        found = self.checkpoints.load_latest(self.device)
        if found is None:
            return False
        path, state = found
        if state["seed"] != self.recipe.seed:
            raise RunError(
                f"{path}: written with seed {state['seed']}, the recipe says {self.recipe.seed}; "
                "resume with the same seed (the data split depends on it)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.best_state = state["best_state"]
        self.history = History(**state["history"])
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"]["torch"].cpu())
            np.random.set_state(state["rng"]["numpy"])
            random.setstate(state["rng"]["python"])
        self.start_epoch = state["epoch"] + 1
        log.info(
            "resumed from %s (epoch %d, written by mace_mf %s)", path.name, state["epoch"], state["versions"]["mace_mf"]
        )
        return True

    # -- loop --------------------------------------------------------------------------------
    def _step_module(self) -> torch.nn.Module:
        """The step itself in one process; under torchrun, the step wrapped in DDP.

        DDP fixes the parameters it synchronises when it is built, from ``requires_grad``. The
        heads-only warm-up changes that set between epochs, so DDP is rebuilt when the set changes
        (once per change: a broadcast of the weights, identical on every rank anyway) instead of
        ``find_unused_parameters=True``, which would search the graph for unused parameters at
        every step and still not synchronise parameters that were frozen when DDP was built.
        """
        if not self.dist.enabled:
            return self.step
        trainable = tuple(p.requires_grad for p in self.step.parameters())
        if self._ddp is None or trainable != self._ddp_trainable:
            self._ddp = None  # its reducer's hooks go with it
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = torch.nn.parallel.DistributedDataParallel(
                self.step, device_ids=device_ids, **_ddp_buffer_option()
            )
            self._ddp_trainable = trainable
        return self._ddp

    def _batches(self, epoch: int) -> DataLoader:
        """This process's batches of ``epoch``: the whole batches, or this rank's share of each. The
        loader, and its worker processes, are made once and kept; each epoch reseeds its permutation."""
        t = self.recipe.training
        seed = self.recipe.seed * 100_003 + epoch
        if self._loader is None:
            self._loader = self.train.loader(
                t.batch_size,
                shuffle=True,
                seed=seed,
                workers=t.num_workers,
                steps=t.steps_per_epoch,
                shard=(self.dist.rank, self.dist.world_size),
                pin_memory=self.device.type == "cuda",
                persistent=True,
                riders=self._riders(),
            )
        self._loader.batch_sampler.seed = seed
        return self._loader

    def _riders(self) -> np.ndarray | None:
        """Positions of the training geometries labelled only by the replay fidelity, when they ride
        along the fine-tuning data's batches (``replay.ride_along``); None otherwise."""
        spec = self.recipe.replay
        if spec is None or not spec.enabled or not spec.ride_along:
            return None
        only = replay_only(self.train.table, self.recipe.fidelities)
        return np.flatnonzero(only) if only.any() and not only.all() else None

    def _reduce_step(
        self, loss: torch.Tensor, terms: dict[str, torch.Tensor], penalty: torch.Tensor | None
    ) -> tuple[float, dict[str, float], bool]:
        """The whole batch's loss and terms from this rank's shares, and whether any rank diverged."""
        k = len(self.term_keys)
        local = torch.zeros(2 * k + 2, dtype=torch.float64, device=loss.device)
        local[0] = loss.detach().double()
        for i, key in enumerate(self.term_keys):
            if key in terms:
                local[1 + i] = terms[key].double()
                local[1 + k + i] = 1.0
        finite = bool(torch.isfinite(loss)) and (penalty is None or bool(torch.isfinite(penalty)))
        local[-1] = 0.0 if finite else 1.0
        total = all_reduce_sum(self.dist, local).cpu()
        values = {key: float(total[1 + i]) for i, key in enumerate(self.term_keys) if total[1 + k + i] > 0}
        step_loss = float(total[0])
        if penalty is not None:
            values["c0"] = float(penalty.detach())
            step_loss += values["c0"]
        return step_loss, values, bool(total[-1] == 0)

    def train_epoch(self, epoch: int, progress: Progress | None) -> dict[str, float]:
        t = self.recipe.training
        self.model.train()
        module = self._step_module()
        loader = self._batches(epoch)
        task = progress.add_task(f"epoch {epoch}", total=len(loader)) if progress else None
        sums: dict[str, float] = {}
        total_loss, n_batches = 0.0, 0
        for index, batch in enumerate(loader):
            data = batch_dict(batch.to(self.device, non_blocking=True))
            # Every term's denominator is the whole batch's label count (summed over ranks; in one
            # process, this batch's own count).
            reduced = all_reduce_sum(self.dist, term_counts(data, self.weights))
            loss, terms, penalty = module(data, dict(zip(self.term_keys, reduced, strict=True)))
            # DDP averages gradients over N ranks; each rank's share is already divided by the whole
            # batch's count, so N × share averages to the whole batch's loss (penalty: same on all).
            objective = loss * self.dist.world_size
            objective = objective if penalty is None else objective + penalty
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            # Checked after the backward (the weights are untouched until the step) so that every
            # rank takes the same decision.
            step_loss, values, finite = self._reduce_step(loss, terms, penalty)
            if not finite:
                self._diverged(f"loss is {step_loss}", epoch, index)
            if t.clip_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
                if not torch.isfinite(norm):
                    self._diverged(f"gradient norm is {norm.item()}", epoch, index)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            total_loss += step_loss
            n_batches += 1
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            if progress is not None and task is not None:
                progress.update(task, advance=1, description=f"epoch {epoch} loss {total_loss / n_batches:.4g}")
        if progress is not None and task is not None:
            progress.remove_task(task)
        names = list(self.recipe.fidelities)
        out = {"loss": total_loss / max(n_batches, 1), "steps": n_batches}
        for key, value in sums.items():
            kind, h = key[0], int(key[1:])
            if kind == "c":
                out["coupling_penalty"] = value / n_batches
            else:
                out[f"{names[h]}/{TERM_NAMES[kind]}"] = value / n_batches
        return out

    def _diverged(self, what: str, epoch: int, batch: int) -> None:
        """Stop before a non-finite step reaches the weights; the checkpoints on disk stay good."""
        latest = self.checkpoints.files()
        kept = f"{latest[-1]} is kept" if latest else "no checkpoint was written yet"
        raise RunError(
            f"training: {what} at epoch {epoch}, batch {batch}; lower training.lr or check the labels "
            f"and start again ({kept})"
        )

    def evaluate(self, split: Split) -> dict[str, dict[str, Any]]:
        """Metrics with the EMA weights when EMA is on.

        Under torchrun each rank predicts a contiguous shard; the predictions are gathered so that
        every rank computes the same metrics (and takes the same scheduler/early-stopping step).
        """
        part = split
        if self.dist.enabled:
            start, stop = shard_bounds(len(split), self.dist)
            part = split.subset(np.arange(start, stop))
        t = self.recipe.training
        if self.ema is not None:
            with self.ema.average_parameters():
                pred = predict(self.model, part, self.heads, t.eval_batch_size, self.device, t.num_workers)
        else:
            pred = predict(self.model, part, self.heads, t.eval_batch_size, self.device, t.num_workers)
        if self.dist.enabled:
            pred = merge_predictions(all_gather(self.dist, pred))
        return compute_metrics(split, pred)

    def _averaged_state(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        with self.ema.average_parameters():
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def fit(self) -> History:
        """Train to the recipe's epoch budget (or early stop); the best weights end up in the model."""
        t = self.recipe.training
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
            disable=not self.dist.is_main,
        )
        patience = t.early_stopping_patience
        with progress:
            for epoch in range(self.start_epoch, t.epochs):
                if patience is not None and self.history.bad_epochs >= patience:
                    break  # a resumed run that had already stopped early
                set_backbone_frozen(self.model, epoch < t.freeze_backbone_epochs, t.lr_factors)
                start = time.perf_counter()
                train_terms = self.train_epoch(epoch, progress if self.dist.is_main else None)
                steps = int(train_terms.pop("steps"))
                train_time = time.perf_counter() - start
                valid = self.evaluate(self.valid)
                valid_loss = target_valid_loss(valid, self.recipe)
                self.scheduler.step(valid_loss)
                h = self.history
                improved = valid_loss < h.best_loss
                if improved:
                    h.best_loss, h.best_epoch, h.bad_epochs = valid_loss, epoch, 0
                    self.best_state = self._averaged_state()
                else:
                    h.bad_epochs += 1
                record = {
                    "epoch": epoch,
                    "train": train_terms,
                    "valid": valid,
                    "valid_loss": valid_loss,
                    "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
                    "epoch_time_s": train_time,
                    "steps": steps,
                    "configs_per_s": min(len(self.train), steps * t.batch_size) / train_time
                    if train_time > 0
                    else None,
                    "frozen_backbone": epoch < t.freeze_backbone_epochs,
                }
                h.epochs.append(record)
                target = valid[self.recipe.target]
                log.info(
                    "epoch %d  train loss %.5g  valid %s: E RMSE %s meV/atom, F RMSE %s meV/Å%s  (%.1f s)",
                    epoch,
                    train_terms["loss"],
                    self.recipe.target,
                    _fmt(target["e_rmse_meV_atom"]),
                    _fmt(target["f_rmse_meV_A"]),
                    "  *best*" if improved else "",
                    train_time,
                )
                # Log before the checkpoint: an interruption in between repeats the epoch on resume
                # (logged twice) instead of leaving it out of the tracker for good.
                if self.on_epoch is not None and self.dist.is_main:
                    self.on_epoch(record)
                self.save_checkpoint(epoch)
                if patience is not None and h.bad_epochs >= patience:
                    log.info("early stopping: no improvement for %d epochs", h.bad_epochs)
                    break
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.history


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"
