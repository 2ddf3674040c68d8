"""Scoring displacement pairs (:mod:`mace_mf.data.pairs`): each head's directional force ``F(x)·u``
against the level's finite difference of two energies, and a paired bootstrap that says whether the
pairs resolve which of two models has the better forces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mace.tools.torch_geometric import DataLoader

from mace_mf.data.graphs import batch_dict, graphs_for_model
from mace_mf.data.pairs import Pairs
from mace_mf.model.forward import fidelity_energies, fidelity_forces

BOOTSTRAP_SAMPLES = 2000


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
    """Per fidelity: ``fd_rmse_meV_A`` (the 3N-weighted directional-force RMSE), ``n_pairs``, and the
    signed per-pair errors (meV/Å, None where the fidelity has no pair energies)."""
    result: dict[str, dict[str, Any]] = {}
    weights = pairs.weights
    for j, name in enumerate(fidelities):
        errors = (predicted[:, j] - pairs.reference[:, j]) * 1000.0
        sel = np.isfinite(errors)
        rmse = float(np.sqrt((weights[sel] * errors[sel] ** 2).sum() / weights[sel].sum())) if sel.any() else None
        result[name] = {
            "fd_rmse_meV_A": rmse,
            "n_pairs": int(sel.sum()),
            "errors_meV_A": [float(e) if ok else None for e, ok in zip(errors, sel, strict=True)],
        }
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
        metrics[name].update(fd_rmse_meV_A=entry["fd_rmse_meV_A"], n_pairs=entry["n_pairs"])
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


def paired_preference(
    squared_a: np.ndarray, squared_b: np.ndarray, weights: np.ndarray, seed: int = 0
) -> tuple[float, float, float]:
    """How sure the pairs are that model A's forces beat model B's, from per-pair squared errors:
    the share of bootstrap resamples of the pairs (the same resample for both, so the difficulty the
    two share cancels) in which A's directional RMSE is lower, and the 5th and 95th percentiles of
    RMSE(A)/RMSE(B)."""
    rng = np.random.default_rng(seed)
    n = len(weights)
    idx = rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))
    w = weights[idx]
    a = np.sqrt((w * squared_a[idx]).sum(1) / w.sum(1))
    b = np.sqrt((w * squared_b[idx]).sum(1) / w.sum(1))
    ratio = a / np.maximum(b, 1e-12)
    return float((a < b).mean()), float(np.percentile(ratio, 5)), float(np.percentile(ratio, 95))
