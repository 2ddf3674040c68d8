"""Test helpers: a tiny MACE built here (random but physical), and small labelled data.

The tiny foundation has L=1 hidden features so equivariance is exercised for real; the data files
carry two fidelities from two Morse potentials, so every label is a true energy/force pair.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import numpy as np
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.morse import MorsePotential

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEMO = ROOT / "demo"
# The README's "Running your own" recipe, verbatim (paths relative to the repository root).
CONTRACT = """
name: pyseqm-mf
seed: 0
dtype: float64
device: cpu
foundation:
  model: ../shared/models/spice_small_2022.model
fidelities:
  pm6: {energy_key: pm6_energy, forces_key: pm6_forces, energy_weight: 1.0, forces_weight: 10.0}
  dft: {energy_key: dft_energy, forces_key: dft_forces, energy_weight: 10.0, forces_weight: 0.0}
data:
  train: ../shared/data/pyseqm_chno/train.xyz
  valid: ../shared/data/pyseqm_chno/valid.xyz
  test: ../shared/data/pyseqm_chno/test.xyz
training: {epochs: 30, batch_size: 16, lr: 0.001, target: dft}
export: {fidelities: [dft, pm6]}
wandb: {mode: disabled}
"""
MOLECULES = ("CH4", "H2O", "NH3", "CH3OH", "C2H6", "HCOOH", "CH3CHO", "C2H4")


def build_tiny_mace() -> torch.nn.Module:
    """A small ScaleShiftMACE (H, C, N, O; 8x0e+8x1o; 2 interactions) with seeded weights.

    Building a MACE runs e3nn's code generation (seconds), so it is built once and copied.
    """
    return copy.deepcopy(_tiny_mace())


@functools.cache
def _tiny_mace() -> torch.nn.Module:
    return tiny_scale_shift_mace(residual_first=True, seed=0)


def tiny_scale_shift_mace(residual_first: bool, seed: int) -> torch.nn.Module:
    """A small float64 ScaleShiftMACE (H, C, N, O); ``residual_first=False`` is the layout
    ``mace_run_train`` builds (no residual in the first interaction)."""
    from e3nn import o3
    from mace.modules import blocks
    from mace.modules.models import ScaleShiftMACE

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = ScaleShiftMACE(
            r_max=4.0,
            num_bessel=6,
            num_polynomial_cutoff=5,
            max_ell=2,
            interaction_cls=blocks.RealAgnosticResidualInteractionBlock,
            interaction_cls_first=(
                blocks.RealAgnosticResidualInteractionBlock if residual_first else blocks.RealAgnosticInteractionBlock
            ),
            num_interactions=2,
            num_elements=4,
            hidden_irreps=o3.Irreps("8x0e+8x1o"),
            MLP_irreps=o3.Irreps("8x0e"),
            gate=torch.nn.functional.silu,
            atomic_energies=np.array([-13.6, -1029.0, -1485.0, -2042.0]),
            avg_num_neighbors=4.0,
            atomic_numbers=[1, 6, 7, 8],
            correlation=2,
            radial_type="bessel",
            atomic_inter_scale=1.2,
            atomic_inter_shift=0.0,
            # e3nn's Clebsch-Gordan basis whether or not cuequivariance is installed (with it,
            # mace-torch's default builds a smaller, reduced basis: another model)
            use_reduced_cg=False,
        )
    finally:
        torch.set_default_dtype(previous)
    return model


def sample_molecules(n: int, seed: int) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        atoms = molecule(MOLECULES[i % len(MOLECULES)])
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.center(vacuum=5.0)
        atoms.pbc = False
        frames.append(atoms)
    return frames


def label(
    frames: list[Atoms], name: str, epsilon: float, r0: float, offset: float, energy: bool = True, forces: bool = True
) -> None:
    """Morse-potential labels (plus a per-atom offset: a different absolute scale)."""
    calc = MorsePotential(epsilon=epsilon, r0=r0, rho0=6.0)
    for atoms in frames:
        calc.calculate(atoms, ["energy", "forces"])
        if energy:
            atoms.info[f"{name}_energy"] = float(calc.results["energy"]) + offset * len(atoms)
        if forces:
            atoms.arrays[f"{name}_forces"] = np.array(calc.results["forces"])


def write_recipe(path: Path, foundation: Path, files: dict[str, Path], **training: object) -> Path:
    import yaml

    recipe = {
        "name": "tiny",
        "seed": 0,
        "foundation": {"model": str(foundation)},
        "fidelities": {
            "lo": {"energy_key": "lo_energy", "forces_key": "lo_forces", "energy_weight": 1.0, "forces_weight": 10.0},
            "hi": {"energy_key": "hi_energy", "forces_key": "hi_forces", "energy_weight": 10.0, "forces_weight": 0.0},
        },
        "data": {k: str(v) for k, v in files.items()},
        "training": {"epochs": 2, "batch_size": 4, "lr": 0.005, "target": "hi", **training},
        "export": {"torchscript": False},
        "md_check": {"structures": 1, "steps": 5},  # the code path, cheaply; tests/test_md_check.py tests physics
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def fidelity_model(foundation: torch.nn.Module, fidelities: list[str], head: str | None = None) -> torch.nn.Module:
    """One head per fidelity, each an exact copy of the foundation's ``head`` (its first by default)."""
    from mace_mf.model.heads import extract_head, head_names, replicate_head

    return replicate_head(extract_head(foundation, head or head_names(foundation)[0]), fidelities)
