"""Physical sanity of what mace_mf trains and exports, checked the same way on both.

Every check runs on two evaluators of one fine-tuned run: mace_mf's own shared-backbone forward on
the multi-head model (what training optimises) and stock ``MACECalculator`` on the exported
single-head file (what a user runs). Checks: energies invariant and forces equivariant under rigid
motions, invariance under permuting atoms, forces equal to central finite differences of the
energy, energy and forces continuous where a pair crosses the cutoff, and an isolated atom's
energy equal to its head's E0.

The foundation here has the standard MACE layout (a first interaction without a residual
connection, zero shift), under which an isolated atom has no learned energy. With a residual first
layer -- as in ``tests/support.py``'s tiny model and the demo foundation -- an isolated atom's
energy is E0 plus a learned self-energy, so that check would not apply.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from physics import HeadForward, StockCalculator, check_gradient, check_permutation, check_rigid_motion, rattled
from support import tiny_scale_shift_mace, write_recipe

from mace_mf.config.loading import load_recipe
from mace_mf.model.heads import head_names
from mace_mf.workflows.run import train_run

HEAD = "hi"


def build_standard_tiny_mace() -> torch.nn.Module:
    """A small ScaleShiftMACE laid out as ``mace_run_train`` builds them (H, C, N, O)."""
    return tiny_scale_shift_mace(residual_first=False, seed=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory, two_fidelity_files):
    """One short real fine-tune of the standard-layout foundation."""
    folder = tmp_path_factory.mktemp("physics")
    foundation = folder / "standard.model"
    torch.save(build_standard_tiny_mace(), foundation)
    path = write_recipe(folder / "recipe.yaml", foundation, two_fidelity_files, epochs=1)
    tree = yaml.safe_load(path.read_text())
    tree["md_check"] = {"enabled": False}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return train_run(load_recipe(path), folder / "out")


@functools.cache
def _evaluator(kind: str, folder: str):
    from pathlib import Path

    models = Path(folder) / "models"
    if kind == "mace_mf":
        return HeadForward(torch.load(models / "multihead.model", weights_only=False), HEAD)
    return StockCalculator(models / f"{HEAD}.model")


@pytest.fixture(params=["mace_mf", "exported"])
def evaluate(request, run):
    return _evaluator(request.param, str(run))


def test_rigid_motion_keeps_energy_and_rotates_forces(evaluate):
    check_rigid_motion(evaluate, rattled("CH3OH", 1), atol_e=1e-9, atol_f=1e-9)


def test_permuting_atoms_keeps_energy_and_permutes_forces(evaluate):
    check_permutation(evaluate, rattled("CH3CHO", 3), atol_e=1e-9, atol_f=1e-9)


def test_forces_are_central_finite_differences_of_the_energy(evaluate):
    check_gradient(evaluate, rattled("HCOOH", 5), step=1e-4, atol=1e-6)


def _dimer(distance: float) -> Atoms:
    return Atoms("OH", positions=[[0.0, 0.0, 0.0], [distance, 0.0, 0.0]])


def test_energy_and_forces_are_continuous_at_the_cutoff(evaluate):
    r_max = evaluate.r_max
    inside_e, inside_f = evaluate(_dimer(r_max - 1e-6))
    outside_e, outside_f = evaluate(_dimer(r_max + 1e-6))
    separate = evaluate(Atoms("O"))[0] + evaluate(Atoms("H"))[0]
    assert inside_e == pytest.approx(outside_e, abs=1e-9)
    assert outside_e == pytest.approx(separate, abs=1e-9)  # beyond the cutoff nothing interacts
    assert np.abs(inside_f).max() < 1e-6 and np.abs(outside_f).max() == 0.0
    near_e, _ = evaluate(_dimer(r_max - 1.0))
    assert abs(near_e - separate) > 1e-6  # inside, the pair does interact: the test can fail


def test_isolated_atom_energy_is_the_heads_e0(evaluate, run):
    multihead = torch.load(run / "models" / "multihead.model", weights_only=False)
    h = head_names(multihead).index(HEAD)
    fitted = torch.atleast_2d(multihead.atomic_energies_fn.atomic_energies)[h].detach().numpy()
    np.testing.assert_allclose(evaluate.e0, fitted)  # the exported file carries the head's fitted E0s
    for i, z in enumerate(evaluate.z_table.zs):
        energy, forces = evaluate(Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]]))
        assert energy == pytest.approx(float(evaluate.e0[i]), abs=1e-10), z
        assert np.abs(forces).max() == 0.0
    assert not np.allclose(evaluate.e0, [-13.6, -1029.0, -1485.0, -2042.0])  # refitted, not the foundation's
