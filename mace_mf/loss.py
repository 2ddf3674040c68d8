"""The multi-fidelity loss.

    L = Σ_f  w_E(f) · MSE_f(E/atom)  +  w_F(f) · MSE_f(F components)

Each term is averaged over the entries that carry that label (its own mask count), so a fidelity
labelled on 5 % of the batch weighs as much per entry as one labelled everywhere, and an absent
label contributes exactly zero: no gradient, no dilution of the mean. A fidelity with
``forces_weight`` 0 is never differentiated for forces during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Weights:
    """Loss weights per head index."""

    energy: tuple[float, ...]
    forces: tuple[float, ...]

    def force_heads(self) -> list[int]:
        """Heads whose forces are trained on."""
        return [h for h, w in enumerate(self.forces) if w > 0.0]


def masked_mse(error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``error²`` over entries where ``mask`` is 1; 0 (with a graph) when none are."""
    count = mask.sum()
    return (error.square() * mask).sum() / count.clamp(min=1.0)


def energy_errors(pred: torch.Tensor, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-atom energy errors ``[n_graphs, H]`` (prediction − label)."""
    num_atoms = (data["ptr"][1:] - data["ptr"][:-1]).to(pred.dtype).unsqueeze(1)
    return (pred - data["mf_energy"]) / num_atoms


def node_force_mask(data: dict[str, torch.Tensor], head: int) -> torch.Tensor:
    """``[n_nodes, 1]`` mask of force labels of one head, broadcast from its graph."""
    return data["mf_forces_mask"][data["batch"], head].unsqueeze(1)


def multi_fidelity_loss(
    energies: torch.Tensor,
    forces: dict[int, torch.Tensor],
    data: dict[str, torch.Tensor],
    weights: Weights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms (``e<h>``, ``f<h>``: unweighted MSEs, detached)."""
    e_err = energy_errors(energies, data)
    total = energies.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    for h, w_e in enumerate(weights.energy):
        mse_e = masked_mse(e_err[:, h], data["mf_energy_mask"][:, h])
        terms[f"e{h}"] = mse_e.detach()
        if w_e > 0.0:
            total = total + w_e * mse_e
    for h, pred in forces.items():
        mse_f = masked_mse(pred - data["mf_forces"][:, h], node_force_mask(data, h).expand_as(pred))
        terms[f"f{h}"] = mse_f.detach()
        total = total + weights.forces[h] * mse_f
    return total, terms
