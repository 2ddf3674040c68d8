"""Error metrics per split and fidelity, and the tables that show them.

Metrics are computed per split and per fidelity over exactly the entries that carry that label:
energy MAE/RMSE per atom in meV/atom, force-component MAE/RMSE in meV/Å. A fidelity trained without
forces is still scored on forces wherever they exist, which is how high-level forces that were never
trained on are measured. Where a fidelity has no forces at all, displacement pairs of validation
geometries (:mod:`mace_mf.evaluation.pairs`) measure them from energies: ``fd_rmse_meV_A`` over
``n_pairs`` pairs, with the 95 % bootstrap interval of that estimate and the number of pairs that
would narrow it to ±5 % (an estimate from 40 pairs is good to about ±30 %, docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np

from mace_mf.data.graphs import Split
from mace_mf.evaluation.predict import Predictions

METRIC_KEYS = (
    "e_mae_meV_atom",
    "e_rmse_meV_atom",
    "f_mae_meV_A",
    "f_rmse_meV_A",
    "fd_rmse_meV_A",
    "fd_rmse_lo_meV_A",
    "fd_rmse_hi_meV_A",
    "n_e",
    "n_f",
    "n_pairs",
    "fd_pairs_for_5pct",
)
# the pairs' estimate: its 95 % bootstrap interval, and the pairs that would narrow that to ±5 %
INTERVAL_KEYS = ("fd_rmse_lo_meV_A", "fd_rmse_hi_meV_A", "fd_pairs_for_5pct")
PAIR_KEYS = ("fd_rmse_meV_A", *INTERVAL_KEYS, "n_pairs")


def compute_metrics(split: Split, pred: Predictions) -> dict[str, dict[str, float | int | None]]:
    """``{fidelity: {e_mae_meV_atom, e_rmse_meV_atom, f_mae_meV_A, f_rmse_meV_A, n_e, n_f}}``."""
    natoms = split.natoms()
    labels = split.energies()
    e_mask = split.energy_mask()
    result: dict[str, dict[str, float | int | None]] = {}
    for h, name in enumerate(split.fidelities):
        entry: dict[str, float | int | None] = dict.fromkeys(k for k in METRIC_KEYS if k not in PAIR_KEYS)
        sel = e_mask[:, h]
        if sel.any():
            err = (pred.energies[sel, h] - labels[sel, h]) / natoms[sel] * 1000.0
            entry.update(e_mae_meV_atom=float(np.abs(err).mean()), e_rmse_meV_atom=float(np.sqrt((err**2).mean())))
        entry["n_e"] = int(sel.sum())
        if pred.components[h]:
            entry.update(
                f_mae_meV_A=float(pred.absolutes[h] / pred.components[h] * 1000.0),
                f_rmse_meV_A=float(np.sqrt(pred.squares[h] / pred.components[h]) * 1000.0),
            )
        entry["n_f"] = int(pred.configs[h])
        result[name] = entry  # mace_mf.evaluation.pairs adds PAIR_KEYS where pairs are scored
    return result


METRIC_HEADERS = {
    "e_mae_meV_atom": "E MAE (meV/atom)",
    "e_rmse_meV_atom": "E RMSE (meV/atom)",
    "f_mae_meV_A": "F MAE (meV/Å)",
    "f_rmse_meV_A": "F RMSE (meV/Å)",
    "fd_rmse_meV_A": "F·u RMSE, pairs (meV/Å)",
    "fd_rmse_lo_meV_A": "F·u 95 % low",
    "fd_rmse_hi_meV_A": "F·u 95 % high",
    "n_e": "n_E",
    "n_f": "n_F",
    "n_pairs": "n_pairs",
    "fd_pairs_for_5pct": "pairs for ±5 %",
}


def metric_columns(metrics: dict[str, dict[str, dict[str, float | int | None]]]) -> list[str]:
    """The metric keys a table shows: the pair columns only where some entry was scored on pairs."""
    scored = any(m.get("n_pairs") for per_fidelity in metrics.values() for m in per_fidelity.values())
    return [k for k in METRIC_KEYS if scored or k not in PAIR_KEYS]


def metrics_header(metrics: dict[str, dict[str, dict[str, float | int | None]]]) -> list[str]:
    return ["split", "fidelity", *(METRIC_HEADERS[k] for k in metric_columns(metrics))]


def metrics_rows(metrics: dict[str, dict[str, dict[str, float | int | None]]]) -> list[list[str]]:
    """One formatted row per split and fidelity (``–`` where a label is absent)."""

    def fmt(value: float | int | None) -> str:
        return "–" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))

    columns = metric_columns(metrics)
    return [
        [split, name, *(fmt(m.get(k)) for k in columns)]
        for split, per_fidelity in metrics.items()
        for name, m in per_fidelity.items()
    ]


def metrics_table(metrics: dict[str, dict[str, dict[str, float | int | None]]]) -> str:
    """Markdown table of every split and fidelity."""
    header = metrics_header(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in metrics_rows(metrics)]
    return "\n".join(lines)
