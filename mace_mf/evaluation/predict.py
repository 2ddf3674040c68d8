"""Predictions of a model's heads on a split: energies everywhere, forces where they are labelled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mace_mf.data.graphs import Split, batch_dict
from mace_mf.model.forward import fidelity_energies, fidelity_forces


@dataclass
class Predictions:
    """Model outputs on one split, in the split's configuration order."""

    energies: np.ndarray  # [n_configs, H]
    forces: list[list[np.ndarray | None]]  # [H][n_configs] (None where no force label)


def predict(
    model: torch.nn.Module, split: Split, model_heads: Sequence[int], batch_size: int, device: torch.device
) -> Predictions:
    """Energies of ``model_heads`` (column j ↔ split fidelity j) and forces where labelled."""
    energies: list[np.ndarray] = []
    forces: list[list[np.ndarray | None]] = [[] for _ in model_heads]
    model.eval()
    for batch in split.loader(batch_size):
        data = batch_dict(batch.to(device))
        has_forces = data["mf_forces_mask"].sum(0) > 0
        columns = [j for j in range(len(model_heads)) if bool(has_forces[j])]
        # Energies alone need no autograd graph (E0 fits, energy-only data): ~15 % faster, less memory.
        with torch.set_grad_enabled(bool(columns)):
            pred = fidelity_energies(model, data, model_heads)
            grads = fidelity_forces(pred, data["positions"], columns, create_graph=False) if columns else []
        by_column = dict(zip(columns, grads, strict=True))
        energies.append(pred.detach().cpu().double().numpy())
        ptr = data["ptr"].cpu().numpy()
        mask = data["mf_forces_mask"].cpu().numpy()
        for j in range(len(model_heads)):
            for g in range(len(ptr) - 1):
                if j in by_column and mask[g, j] > 0:
                    forces[j].append(by_column[j][ptr[g] : ptr[g + 1]].detach().cpu().double().numpy())
                else:
                    forces[j].append(None)
    stacked = np.concatenate(energies) if energies else np.zeros((0, len(model_heads)))
    return Predictions(stacked, forces)
