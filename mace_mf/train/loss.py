"""The multi-fidelity loss.

    L = Σ_f  w_E(f) · MSE_f(E/atom)  +  w_F(f) · MSE_f(F components)
          + w_P(f) · MSE(F_f − F labels of base(f))     (cross-fidelity force prior, optional)

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
    base: tuple[int | None, ...] = ()
    base_forces: tuple[float, ...] = ()

    def force_heads(self) -> list[int]:
        """Heads whose forces enter the loss (own labels, or the base's as a prior)."""
        return [h for h in range(len(self.forces)) if self.forces[h] > 0.0 or self.prior(h) > 0.0]

    def prior(self, head: int) -> float:
        """Weight of the cross-fidelity force prior of ``head`` (0 when it has none)."""
        return self.base_forces[head] if self.base_forces and self.base[head] is not None else 0.0

    def force_need(self, forces_mask: torch.Tensor) -> torch.Tensor:
        """``[n_graphs, H]``: which graphs' forces of which head the loss reads, given the per-graph
        ``forces_mask [n_graphs, H]`` (own labels trained on, or the base's labels as a prior)."""
        labelled = forces_mask.bool()
        need = torch.zeros_like(labelled)
        for h in self.force_heads():
            if self.forces[h] > 0.0:
                need[:, h] |= labelled[:, h]
            base = self.base[h] if self.base else None
            if self.prior(h) > 0.0 and base is not None:
                need[:, h] |= labelled[:, base]
        return need


def masked_mse(error: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``error²`` over entries where ``mask`` is 1; 0 (with a graph) when none are.

    ``count``: the denominator when it is not this batch's own mask sum (one shard of a batch split
    across processes divides by the whole batch's count, so that the shards' terms add up).
    """
    count = mask.sum() if count is None else count
    return (error.square() * mask).sum() / count.clamp(min=1.0)


def energy_errors(pred: torch.Tensor, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-atom energy errors ``[n_graphs, H]`` (prediction − label)."""
    num_atoms = (data["ptr"][1:] - data["ptr"][:-1]).to(pred.dtype).unsqueeze(1)
    return (pred - data["mf_energy"]) / num_atoms


def node_force_mask(data: dict[str, torch.Tensor], head: int) -> torch.Tensor:
    """``[n_nodes, 1]`` mask of force labels of one head, broadcast from its graph."""
    return data["mf_forces_mask"][data["batch"], head].unsqueeze(1)


def term_keys(weights: Weights) -> list[str]:
    """Every loss term a batch can have, in a fixed order (``e<h>``, then ``f<h>``, ``p<h>``)."""
    keys = [f"e{h}" for h in range(len(weights.energy))]
    for h in weights.force_heads():
        if weights.forces[h] > 0.0:
            keys.append(f"f{h}")
        if weights.prior(h) > 0.0:
            keys.append(f"p{h}")
    return keys


def term_counts(data: dict[str, torch.Tensor], weights: Weights) -> torch.Tensor:
    """Each term's label count in this batch (:func:`term_keys` order): its MSE's denominator.

    Summed over the shards of a batch split across processes, these are the whole batch's
    denominators, which :func:`multi_fidelity_loss` then takes as ``counts``.
    """
    node_forces = data["mf_forces_mask"][data["batch"]]  # [n_nodes, H]
    values = [data["mf_energy_mask"][:, h].sum() for h in range(len(weights.energy))]
    for h in weights.force_heads():
        own = node_forces[:, h] if weights.forces[h] > 0.0 else torch.zeros_like(node_forces[:, h])
        if weights.forces[h] > 0.0:
            values.append(3.0 * own.sum())
        base = weights.base[h] if weights.base else None
        if weights.prior(h) > 0.0 and base is not None:
            values.append(3.0 * (node_forces[:, base] * (1.0 - own)).sum())
    return torch.stack(values)


def multi_fidelity_loss(
    energies: torch.Tensor,
    forces: dict[int, torch.Tensor],
    data: dict[str, torch.Tensor],
    weights: Weights,
    counts: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms (``e<h>``, ``f<h>``: unweighted MSEs, detached).

    ``counts`` (by term key): denominators of the whole batch when ``data`` is one shard of it.
    """
    e_err = energy_errors(energies, data)
    total = energies.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    given = counts or {}
    for h, w_e in enumerate(weights.energy):
        mse_e = masked_mse(e_err[:, h], data["mf_energy_mask"][:, h], given.get(f"e{h}"))
        terms[f"e{h}"] = mse_e.detach()
        if w_e > 0.0:
            total = total + w_e * mse_e
    for h, pred in forces.items():
        own = node_force_mask(data, h)
        if weights.forces[h] > 0.0:
            mse_f = masked_mse(pred - data["mf_forces"][:, h], own.expand_as(pred), given.get(f"f{h}"))
            terms[f"f{h}"] = mse_f.detach()
            total = total + weights.forces[h] * mse_f
        base = weights.base[h] if weights.base else None
        if weights.prior(h) > 0.0 and base is not None:
            # Only where this fidelity's own force labels are not trained on: there, they rule.
            trained_own = own if weights.forces[h] > 0.0 else torch.zeros_like(own)
            mask = (node_force_mask(data, base) * (1.0 - trained_own)).expand_as(pred)
            mse_p = masked_mse(pred - data["mf_forces"][:, base], mask, given.get(f"p{h}"))
            terms[f"p{h}"] = mse_p.detach()
            total = total + weights.prior(h) * mse_p
    return total, terms
