"""Scoring a model on a recipe's splits: metrics of every split and fidelity, parity plots, and the
validation displacement pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mace_mf.config.schema import Recipe
from mace_mf.data.splits import Splits, statistics_sample
from mace_mf.evaluation.metrics import compute_metrics
from mace_mf.evaluation.pairs import score_pairs
from mace_mf.evaluation.plots import parity_plot
from mace_mf.evaluation.predict import predict
from mace_mf.files import atomic_write_text


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
    t = recipe.training
    metrics: dict[str, Any] = {}
    for name, split in splits.named().items():
        if name == "train":  # what the training set's errors say needs no full pass over a million
            split = statistics_sample(split, recipe, "the training metrics")
        pred = predict(model, split, heads, t.eval_batch_size, device, t.num_workers)
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
