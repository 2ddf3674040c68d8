"""Coupled heads: a delta head starts as its base, folds into one stock readout, penalties act."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase.build import molecule
from mace.calculators import MACECalculator
from support import build_tiny_mace, fidelity_model
from test_heads import energies_and_forces, perturbed

from mace_mf.model.coupling import HeadCoupling, coupling_penalty
from mace_mf.model.heads import extract_head, make_delta_head, merge_heads, readout_weights
from mace_mf.train.loss import Weights, multi_fidelity_loss

FIDELITIES = ["lo", "hi", "top"]


def delta_model(seed: int = 1) -> torch.nn.Module:
    """lo independent; hi = lo + Δ; top = hi + Δ' (a chain of two corrections), all trained-looking."""
    model = perturbed(fidelity_model(build_tiny_mace(), FIDELITIES), seed=seed)
    make_delta_head(model, 1, 0)
    make_delta_head(model, 2, 1)
    return model


def test_delta_head_starts_with_the_base_forces():
    model = perturbed(fidelity_model(build_tiny_mace(), FIDELITIES))
    make_delta_head(model, 1, 0)
    atoms = molecule("CH3CHO")
    atoms.rattle(0.05, seed=2)
    energies, forces = energies_and_forces(model, atoms, [0, 1])
    np.testing.assert_allclose(forces[1], forces[0], atol=1e-12)
    counts = np.bincount([int(z) for z in atoms.numbers], minlength=10)
    e0 = model.atomic_energies_fn.atomic_energies.detach().numpy()
    zs = [int(z) for z in model.atomic_numbers]
    shift = sum(counts[z] * (e0[1, i] - e0[0, i]) for i, z in enumerate(zs))
    assert energies[1] == pytest.approx(energies[0] + shift, abs=1e-10)


def test_delta_chain_folds_into_stock_files():
    model = delta_model()
    with torch.no_grad():  # corrections that are no longer zero, as after training
        for h in (1, 2):
            for w in readout_weights(model, h, outputs_only=True):
                w.add_(0.2 * torch.randn_like(w))
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=4)
    energies, forces = energies_and_forces(model, atoms, [0, 1, 2])
    assert not np.allclose(forces[2], forces[1], atol=1e-6)  # the corrections do something
    singles = [extract_head(model, name) for name in FIDELITIES]
    merged = merge_heads(singles, FIDELITIES)
    for h, name in enumerate(FIDELITIES):
        calc = MACECalculator(models=copy.deepcopy(singles[h]), device="cpu", default_dtype="float64")
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(energies[h], abs=1e-9)
        np.testing.assert_allclose(atoms.get_forces(), forces[h], atol=1e-9)
        calc = MACECalculator(models=copy.deepcopy(merged), device="cpu", default_dtype="float64", head=name)
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(energies[h], abs=1e-9)
        np.testing.assert_allclose(atoms.get_forces(), forces[h], atol=1e-9)
    assert not hasattr(singles[1], "mf_delta_bases") and not hasattr(merged, "mf_delta_bases")


def test_penalties_measure_what_they_say():
    model = perturbed(fidelity_model(build_tiny_mace(), FIDELITIES))
    tied = [HeadCoupling(1, 0, "tied", 2.0)]
    expected = 2.0 * sum(
        (a - b).square().sum() for a, b in zip(readout_weights(model, 1), readout_weights(model, 0), strict=True)
    )
    assert coupling_penalty(model, tied).item() == pytest.approx(expected.item())
    clean = fidelity_model(build_tiny_mace(), FIDELITIES)
    assert coupling_penalty(clean, tied).item() == 0.0  # identical copies: nothing to pull
    make_delta_head(clean, 1, 0)
    assert coupling_penalty(clean, [HeadCoupling(1, 0, "delta", 5.0)]).item() == 0.0  # Δ starts at zero
    assert coupling_penalty(model, [HeadCoupling(1, 0, "tied", 0.0)]) is None


def test_force_prior_uses_base_labels_where_own_forces_are_not_trained():
    n = 5
    pred = torch.zeros(n, 3)
    data = {
        "mf_forces": torch.stack([torch.ones(n, 3), 3 * torch.ones(n, 3)], dim=1),  # [n, H=2, 3]
        "mf_forces_mask": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        "batch": torch.tensor([0, 0, 1, 1, 1]),
        "ptr": torch.tensor([0, 2, 5]),
        "mf_energy": torch.zeros(2, 2),
        "mf_energy_mask": torch.zeros(2, 2),
    }
    weights = Weights((0.0, 0.0), (0.0, 0.0), (None, 0), (0.5, 0.0))
    assert weights.force_heads() == []  # a prior weight without a base does nothing
    weights = Weights((0.0, 0.0), (0.0, 1.0), (None, 0), (0.0, 0.5))
    assert weights.force_heads() == [1]
    total, terms = multi_fidelity_loss(torch.zeros(2, 2), {1: pred}, data, weights)
    # graph 0 (2 atoms) has only base labels (= 1): prior MSE 1; graph 1's own labels (= 3) are
    # trained on, so the prior leaves it alone.
    assert terms["p1"].item() == pytest.approx(1.0)
    assert terms["f1"].item() == pytest.approx(9.0)
    assert total.item() == pytest.approx(0.5 * 1.0 + 1.0 * 9.0)
    # own labels present but not trained on (forces_weight 0, scored only): the prior covers them too
    weights = Weights((0.0, 0.0), (0.0, 0.0), (None, 0), (0.0, 0.5))
    total, terms = multi_fidelity_loss(torch.zeros(2, 2), {1: pred}, data, weights)
    assert terms["p1"].item() == pytest.approx(1.0) and "f1" not in terms
