"""Plots of a run: parity of each fidelity on a split, and the learning curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mace_mf.data.graphs import Split
from mace_mf.evaluation.predict import PLOT_CONFIGS, Predictions


def parity_plot(split: Split, pred: Predictions, fidelity: int, path: Path) -> bool:
    """Energy and force parity plots of one fidelity on one split; False if it has no labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    natoms = split.natoms()
    sel = split.energy_mask()[:, fidelity].copy()
    sel[np.flatnonzero(sel)[PLOT_CONFIGS:]] = False  # the first configurations, as for the forces
    forces = [(p, r) for _, p, r in pred.forces[fidelity]]
    if not sel.any() and not forces:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    name = split.fidelities[fidelity]
    if sel.any():
        # Total energies are dominated by composition; remove a per-element linear baseline fitted
        # to the reference (the same for both axes) so the plot shows what the model has to learn.
        zs = sorted(split.table.configs.elements)
        counts = split.table.configs.element_counts(split.table.rows[sel], zs)
        ref_total = split.energies()[sel, fidelity]
        baseline = counts @ np.linalg.lstsq(counts, ref_total, rcond=None)[0]
        ref = (ref_total - baseline) / natoms[sel]
        out = (pred.energies[sel, fidelity] - baseline) / natoms[sel]
        _parity(axes[0], ref, out, "energy − composition baseline (eV/atom)", (out - ref) * 1000.0, "meV/atom")
    else:
        axes[0].set_axis_off()
    if forces:
        out = np.concatenate([p.ravel() for p, _ in forces])
        ref = np.concatenate([r.ravel() for _, r in forces])
        _parity(axes[1], ref, out, "force component (eV/Å)", (out - ref) * 1000.0, "meV/Å")
    else:
        axes[1].set_axis_off()
    shown = "" if len(split) <= PLOT_CONFIGS else f", the first {PLOT_CONFIGS} labelled shown"
    fig.suptitle(f"{name} — {split.name} ({len(split)} configurations{shown})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _parity(ax, ref: np.ndarray, out: np.ndarray, label: str, err: np.ndarray, unit: str) -> None:
    lo, hi = float(min(ref.min(), out.min())), float(max(ref.max(), out.max()))
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
    ax.scatter(ref, out, s=4, alpha=0.5)
    ax.set_xlabel(f"reference {label}")
    ax.set_ylabel(f"predicted {label}")
    rmse = float(np.sqrt((err**2).mean()))
    mae = float(np.abs(err).mean())
    ax.text(0.04, 0.94, f"RMSE {rmse:.1f} {unit}\nMAE {mae:.1f} {unit}", transform=ax.transAxes, va="top")


def curve_plot(epochs: list[dict[str, Any]], best_epoch: int, fidelities: list[str], path: Path) -> bool:
    """Training loss, and validation errors of every fidelity, per epoch (history records), on log
    axes labelled with plain numbers; the kept (best) epoch marked. False when there were no epochs."""
    if not epochs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    numbers = [r["epoch"] for r in epochs]
    axes[0].plot(numbers, [r["train"]["loss"] for r in epochs], marker="o", ms=3, color="0.2", label="train loss")
    axes[0].plot(numbers, [r["valid_loss"] for r in epochs], marker="o", ms=3, color="C3", label="valid loss")
    for name in fidelities:
        for ax, key in zip(axes[1:], ("e_rmse_meV_atom", "f_rmse_meV_A"), strict=True):
            values = [r["valid"][name][key] for r in epochs]
            if all(v is not None for v in values):
                ax.plot(numbers, values, marker="o", ms=3, label=name)
    titles = ("loss (weighted, eV², eV²/Å²)", "valid energy RMSE (meV/atom)", "valid force RMSE (meV/Å)")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        if best_epoch >= 0:
            ax.axvline(best_epoch, color="0.6", ls="--", lw=1, label=f"kept: epoch {best_epoch}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
