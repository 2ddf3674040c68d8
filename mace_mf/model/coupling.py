"""How a fidelity's head relates to a lower-level one (``base``): the recipe's coupling options.

Independent heads on a shared backbone (mace-torch's multi-head fine-tuning) let the high-level
head fit its energies with features whose gradients are not the high-level forces
(docs/benchmarks.md, "Fidelity coupling"). The options here tie the high head to the low head that
*was* trained on forces:

- ``delta``: energy(high) = energy(base) + ΔE with ΔE starting at zero (:func:`heads.make_delta_head`),
  optionally with an L2 penalty on ΔE's output weights;
- ``tied``: an independent readout pulled toward the base's readout by an L2 penalty;
- ``base_forces_weight``: a weak loss term pulling the high head's forces toward the base's force
  labels where the high level has none (handled by :mod:`mace_mf.train.loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mace_mf.config.schema import Recipe
from mace_mf.model.heads import make_delta_head, readout_weights


@dataclass(frozen=True)
class HeadCoupling:
    """One head's coupling, by head index."""

    head: int
    base: int
    mode: str
    strength: float


def couplings(recipe: Recipe) -> list[HeadCoupling]:
    """The coupled heads of a recipe (independent heads without a penalty are left out)."""
    names = list(recipe.fidelities)
    return [
        HeadCoupling(h, names.index(spec.base), spec.coupling, spec.coupling_strength)
        for h, spec in enumerate(recipe.fidelities.values())
        if spec.base is not None and (spec.coupling == "delta" or spec.coupling_strength > 0)
    ]


def apply_couplings(model: torch.nn.Module, recipe: Recipe) -> None:
    """Make the ``delta`` heads corrections of their bases (before E0s are fitted)."""
    for c in couplings(recipe):
        if c.mode == "delta":
            make_delta_head(model, c.head, c.base)


def coupling_penalty(model: torch.nn.Module, coupled: list[HeadCoupling]) -> torch.Tensor | None:
    """Σ strength · (‖ΔE output weights‖² for ``delta``, ‖w_head − w_base‖² for ``tied``)."""
    total: torch.Tensor | None = None
    for c in coupled:
        if c.strength == 0.0:
            continue
        if c.mode == "delta":
            term = sum(w.square().sum() for w in readout_weights(model, c.head, outputs_only=True))
        elif c.mode == "tied":
            pairs = zip(readout_weights(model, c.head), readout_weights(model, c.base), strict=True)
            term = sum((w - b).square().sum() for w, b in pairs)
        else:
            continue
        total = c.strength * term if total is None else total + c.strength * term
    return total
