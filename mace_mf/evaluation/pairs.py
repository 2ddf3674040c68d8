"""Scoring displacement pairs (:mod:`mace_mf.data.pairs`): each head's directional force ``F(x)·u``
against the level's finite difference of two energies, and a paired bootstrap that says whether the
pairs resolve which of two models has the better forces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mace.tools.torch_geometric import DataLoader

from mace_mf.data.graphs import batch_dict, graphs_for_model
from mace_mf.data.pairs import Pairs
from mace_mf.evaluation.metrics import INTERVAL_KEYS, PAIR_KEYS
from mace_mf.model.forward import fidelity_energies, fidelity_forces

BOOTSTRAP_SAMPLES = 2000
RESOLUTION = 0.05  # the relative half-width of the 95 % interval that `fd_pairs_for_5pct` asks for


def directional_forces(
    model: torch.nn.Module, pairs: Pairs, heads: Sequence[int], device: torch.device, batch_size: int = 32
) -> np.ndarray:
    """``F(x)·u`` of each model head (column j ↔ ``heads[j]``) at every pair's centre, ``[n_pairs, H]``."""
    graphs = graphs_for_model(pairs.centres, model, len(heads))
    out = np.zeros((len(pairs), len(heads)))
    model.eval()
    start = 0
    for batch in DataLoader(graphs, batch_size=batch_size, shuffle=False, drop_last=False):
        data = batch_dict(batch.to(device))
        energies = fidelity_energies(model, data, list(heads))
        forces = fidelity_forces(energies, data["positions"], range(len(heads)), create_graph=False)
        ptr = data["ptr"].cpu().numpy()
        for g in range(len(ptr) - 1):
            u = pairs.directions[start + g]
            for j, f in enumerate(forces):
                out[start + g, j] = float((f[ptr[g] : ptr[g + 1]].detach().cpu().double().numpy() * u).sum())
        start += len(ptr) - 1
    return out


def pair_metrics(pairs: Pairs, predicted: np.ndarray, fidelities: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per fidelity: ``fd_rmse_meV_A`` (the 3N-weighted directional-force RMSE) with its 95 %
    bootstrap interval and the pairs that would narrow it to ±5 % (:func:`rmse_interval`),
    ``n_pairs``, and the signed per-pair errors (meV/Å, None where the fidelity has no pair energies)."""
    result: dict[str, dict[str, Any]] = {}
    weights = pairs.weights
    for j, name in enumerate(fidelities):
        errors = (predicted[:, j] - pairs.reference[:, j]) * 1000.0
        sel = np.isfinite(errors)
        entry: dict[str, Any] = dict.fromkeys(INTERVAL_KEYS)
        entry["fd_rmse_meV_A"] = weighted_rmse(errors[sel] ** 2, weights[sel]) if sel.any() else None
        if sel.sum() > 1:
            entry.update(zip(INTERVAL_KEYS, rmse_interval(errors[sel] ** 2, weights[sel]), strict=True))
        entry["n_pairs"] = int(sel.sum())
        entry["errors_meV_A"] = [float(e) if ok else None for e, ok in zip(errors, sel, strict=True)]
        result[name] = entry
    return result


def score_pairs(
    model: torch.nn.Module,
    pairs: Pairs,
    heads: Sequence[int],
    fidelities: Sequence[str],
    metrics: dict[str, dict[str, Any]],
    device: torch.device,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Score model head ``heads[j]`` as fidelity ``fidelities[j]`` on the pairs: ``fd_rmse_meV_A``
    and ``n_pairs`` go into ``metrics[fidelity]`` (one split's entries); the returned record (what
    ``pair_errors.json`` holds) keeps the per-pair errors, to compare two models pair by pair."""
    scored = pair_metrics(pairs, directional_forces(model, pairs, heads, device, batch_size), fidelities)
    for name, entry in scored.items():
        metrics[name].update({k: entry[k] for k in PAIR_KEYS})
    return {
        "source": pairs.source,
        "pair_ids": pairs.ids,
        "geometries": pairs.geometries,
        "weights": pairs.weights.tolist(),
        "errors_meV_A": {name: m["errors_meV_A"] for name, m in scored.items()},
    }


def weighted_rmse(squared: np.ndarray, weights: np.ndarray) -> float:
    """The directional-force RMSE of per-pair squared errors (3N-weighted)."""
    return float(np.sqrt((weights * squared).sum() / weights.sum()))


def _bootstrap_rmse(squared: Sequence[np.ndarray], weights: np.ndarray, seed: int) -> list[np.ndarray]:
    """The directional RMSE of each model in ``squared`` over the same bootstrap resamples of the pairs."""
    rng = np.random.default_rng(seed)
    n = len(weights)
    idx = rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))
    w = weights[idx]
    return [np.sqrt((w * s[idx]).sum(1) / w.sum(1)) for s in squared]


def rmse_interval(squared: np.ndarray, weights: np.ndarray, seed: int = 0) -> tuple[float, float, int]:
    """How far the pairs pin down one model's directional-force RMSE: the 2.5th and 97.5th percentiles
    of its bootstrap resamples, and how many pairs would bring that interval to ±5 % of the estimate
    (its relative half-width falls as 1/sqrt(pairs), so ``n (half-width / 5 %)²``)."""
    (resampled,) = _bootstrap_rmse([squared], weights, seed)
    low, high = np.percentile(resampled, [2.5, 97.5])
    centre = weighted_rmse(squared, weights)
    half = (high - low) / 2.0 / max(centre, 1e-12)
    return float(low), float(high), math.ceil(len(weights) * (half / RESOLUTION) ** 2)


def paired_preference(
    squared_a: np.ndarray, squared_b: np.ndarray, weights: np.ndarray, seed: int = 0
) -> tuple[float, float, float]:
    """How sure the pairs are that model A's forces beat model B's, from per-pair squared errors:
    the share of bootstrap resamples of the pairs (the same resample for both, so the difficulty the
    two share cancels) in which A's directional RMSE is lower, and the 5th and 95th percentiles of
    RMSE(A)/RMSE(B)."""
    a, b = _bootstrap_rmse([squared_a, squared_b], weights, seed)
    ratio = a / np.maximum(b, 1e-12)
    return float((a < b).mean()), float(np.percentile(ratio, 5)), float(np.percentile(ratio, 95))
