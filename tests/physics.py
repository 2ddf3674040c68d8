"""Physics checks shared by every test that holds a model: any evaluator (mace_mf's shared-backbone
forward of one head, or stock ``MACECalculator`` on an exported file) must pass them.

An evaluator is a callable ``atoms -> (energy eV, forces eV/Å)``. The checks take tolerances, so the
same check runs in float64 (tight) and float32 (the precision's own rounding):

- :func:`check_rigid_motion`: energy invariant, forces rotate with the atoms;
- :func:`check_permutation`: energy invariant, forces permute with the atoms;
- :func:`check_gradient`: forces are minus the central finite difference of the energy;
- :func:`check_same`: two evaluators agree (an exported file reproduces the in-memory head).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule
from mace.tools import AtomicNumberTable
from mace.tools.torch_geometric import Batch

from mace_mf.data.graphs import batch_dict, to_graph
from mace_mf.data.read import Labels
from mace_mf.model.forward import fidelity_energies, fidelity_forces
from mace_mf.model.heads import head_names

Evaluator = Callable[[Atoms], tuple[float, np.ndarray]]


def rattled(name: str, seed: int, amount: float = 0.05) -> Atoms:
    atoms = molecule(name)
    atoms.rattle(amount, seed=seed)
    return atoms


class HeadForward:
    """mace_mf's training forward (one backbone pass, any head) of one head of an in-memory model."""

    def __init__(self, model: torch.nn.Module, head: str) -> None:
        self.model = model
        self.heads = head_names(model)
        self.h = self.heads.index(head)
        self.dtype = next(model.parameters()).dtype
        self.z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
        self.r_max = float(model.r_max)
        self.e0 = torch.atleast_2d(model.atomic_energies_fn.atomic_energies)[self.h].detach().double().numpy()

    def __call__(self, atoms: Atoms) -> tuple[float, np.ndarray]:
        labels = Labels([None] * len(self.heads), [None] * len(self.heads))
        graph = to_graph(atoms, labels, self.z_table, self.r_max, self.heads, self.dtype)
        data = batch_dict(Batch.from_data_list([graph]))
        energies = fidelity_energies(self.model, data, [self.h])
        (forces,) = fidelity_forces(energies, data["positions"], [0], create_graph=False)
        return float(energies[0, 0]), forces.detach().double().numpy()


class StockCalculator:
    """Stock ``MACECalculator`` on an exported file (``head`` for a multi-head one)."""

    def __init__(self, path, dtype: str = "float64", head: str | None = None) -> None:
        from mace.calculators import MACECalculator

        kwargs = {"head": head} if head is not None else {}
        self.calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype=dtype, **kwargs)
        model = self.calc.models[0]
        index = head_names(model).index(head) if head is not None else 0
        self.r_max = float(model.r_max)
        self.e0 = torch.atleast_2d(model.atomic_energies_fn.atomic_energies)[index].detach().double().numpy()
        self.z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])

    def __call__(self, atoms: Atoms) -> tuple[float, np.ndarray]:
        atoms = atoms.copy()
        atoms.calc = self.calc
        return float(atoms.get_potential_energy()), np.array(atoms.get_forces())


def check_rigid_motion(evaluate: Evaluator, atoms: Atoms, atol_e: float, atol_f: float, seed: int = 2) -> None:
    e0, f0 = evaluate(atoms)
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))[0]
    rotation *= np.sign(np.linalg.det(rotation))
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T + np.array([3.1, -1.7, 0.4])
    e1, f1 = evaluate(moved)
    assert abs(e1 - e0) <= atol_e, (e1, e0)
    np.testing.assert_allclose(f1, f0 @ rotation.T, atol=atol_f)
    assert np.abs(f0).max() > 100 * atol_f  # the forces compared are not trivially zero


def check_permutation(evaluate: Evaluator, atoms: Atoms, atol_e: float, atol_f: float, seed: int = 4) -> None:
    order = np.random.default_rng(seed).permutation(len(atoms))
    e0, f0 = evaluate(atoms)
    e1, f1 = evaluate(atoms[order])
    assert abs(e1 - e0) <= atol_e, (e1, e0)
    np.testing.assert_allclose(f1, f0[order], atol=atol_f)


def check_gradient(evaluate: Evaluator, atoms: Atoms, step: float, atol: float) -> None:
    """Forces equal −(E(x + h e_ik) − E(x − h e_ik)) / 2h for every atom i and direction k."""
    _, forces = evaluate(atoms)
    numeric = np.zeros_like(forces)
    for i in range(len(atoms)):
        for k in range(3):
            energies = []
            for sign in (1.0, -1.0):
                moved = atoms.copy()
                moved.positions[i, k] += sign * step
                energies.append(evaluate(moved)[0])
            numeric[i, k] = -(energies[0] - energies[1]) / (2 * step)
    np.testing.assert_allclose(forces, numeric, atol=atol)


def check_same(first: Evaluator, second: Evaluator, structures: list[Atoms], rtol_e: float, atol_f: float) -> None:
    """Both evaluators give the same energy (relative to its size) and forces on every structure."""
    for atoms in structures:
        e1, f1 = first(atoms)
        e2, f2 = second(atoms)
        assert abs(e1 - e2) <= rtol_e * max(abs(e1), 1.0), (atoms.get_chemical_formula(), e1, e2)
        np.testing.assert_allclose(f1, f2, atol=atol_f, err_msg=atoms.get_chemical_formula())
