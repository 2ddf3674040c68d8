"""The exported target head in the MD engines users run: ASE, OpenMM-ML and torch-sim, from the
single-head file and from `multihead.model` without a head argument (the target is its first head).

Each engine runs 100 steps of MD from the stock calculator's starting point, and its energies and
forces on its own final geometry equal stock `MACECalculator`'s to 1e-6 relative. The engines are in
the `md` extra (and `dev`); a test is skipped, with the reason, only where its package cannot be
imported. No installable LAMMPS has `pair_style mace`: its test runs `scripts/lammps_check.py` where
``MACE_MF_LMP`` names an executable built from ACEsuit's fork (the script says how), else is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms, units
from ase.build import molecule
from mace.calculators import MACECalculator
from support import write_recipe

from mace_mf.config.loading import load_recipe
from mace_mf.workflows.run import train_run

EV_PER_KJ_MOL = 1 / 96.4853321233100184
MOLECULES = ("CH3CH2OH", "CH3CHO", "HCOOH", "CH3OH")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_file, two_fidelity_files):
    """One short fine-tune; its target (`hi`) single-head file and its multi-head file."""
    folder = tmp_path_factory.mktemp("md-engines")
    path = write_recipe(folder / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    tree = yaml.safe_load(path.read_text())
    tree["md_check"] = {"enabled": False}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    run = train_run(load_recipe(path), folder / "run")
    return {"run": run, "single": run / "models" / "hi.model", "multihead": run / "models" / "multihead.model"}


def reference(path, atoms: Atoms) -> tuple[float, np.ndarray]:
    """Stock MACECalculator of the target head (named explicitly for the multi-head file)."""
    head = {"head": "hi"} if path.name == "multihead.model" else {}
    calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64", **head)
    atoms = atoms.copy()
    atoms.calc = calc
    return float(atoms.get_potential_energy()), np.array(atoms.get_forces())


def start(name: str) -> Atoms:
    atoms = molecule(name)
    atoms.rattle(0.03, seed=1)
    return atoms


def test_the_multihead_file_runs_the_target_without_a_head_argument(exported):
    model = torch.load(exported["multihead"], weights_only=False)
    assert model.heads[0] == "hi" and (exported["multihead"].parent / "HEADS.txt").read_text().split()[0] == "hi"
    from mace.data import AtomicData
    from mace.data.utils import config_from_atoms
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_geometric import Batch

    atoms = start("CH3OH")
    table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the file's dtype, as a client sets it
    try:
        graph = AtomicData.from_config(config_from_atoms(atoms), z_table=table, cutoff=float(model.r_max))
    finally:
        torch.set_default_dtype(previous)
    data = Batch.from_data_list([graph]).to_dict()
    del data["head"]  # what a client that knows no heads passes
    energy = float(model(data, compute_force=False)["energy"])
    assert energy == pytest.approx(reference(exported["single"], atoms)[0], rel=1e-12)


@pytest.mark.parametrize("file", ["single", "multihead"])
def test_ase_md(exported, file):
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    path = exported[file]
    atoms = start("CH3CH2OH")
    head = {"head": "hi"} if file == "multihead" else {}
    atoms.calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64", **head)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01, rng=np.random.default_rng(1)).run(100)
    energy, forces = reference(exported["single"], atoms)
    assert atoms.get_potential_energy() == pytest.approx(energy, rel=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), forces, rtol=1e-6, atol=1e-8)
    assert np.abs(atoms.positions - start("CH3CH2OH").positions).max() > 1e-3  # it moved


def _topology(atoms: Atoms):
    """An OpenMM topology with unique atom names (OpenMM's PDB reader merges repeated names)."""
    from openmm.app import Element, Topology

    topology = Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    seen: dict[str, int] = {}
    for symbol in atoms.get_chemical_symbols():
        seen[symbol] = seen.get(symbol, 0) + 1
        topology.addAtom(f"{symbol}{seen[symbol]}", Element.getBySymbol(symbol), residue)
    return topology


@pytest.mark.parametrize("file", ["single", "multihead"])
def test_openmm_ml(exported, file):
    openmm = pytest.importorskip("openmm", reason="openmm is not installed (pip install 'mace-mf[md]')")
    pytest.importorskip("openmmml", reason="openmmml is not installed (pip install 'mace-mf[md]')")
    from openmm import unit
    from openmmml import MLPotential

    atoms = start("CH3CH2OH")
    system = MLPotential("mace", modelPath=str(exported[file])).createSystem(
        _topology(atoms), returnEnergyType="energy", precision="double"
    )
    for index, mass in enumerate(atoms.get_masses()):
        system.setParticleMass(index, mass)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(atoms.positions * 0.1)  # nm
    context.setVelocitiesToTemperature(300 * unit.kelvin, 2)
    for steps in (0, 100):
        integrator.step(steps)
        state = context.getState(getEnergy=True, getForces=True, getPositions=True)
        moved = atoms.copy()
        moved.positions = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        energy, forces = reference(exported["single"], moved)
        assert state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * EV_PER_KJ_MOL == pytest.approx(
            energy, rel=1e-6
        )
        openmm_forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.angstrom)
        np.testing.assert_allclose(openmm_forces * EV_PER_KJ_MOL, forces, rtol=1e-6, atol=1e-6)
    assert np.abs(moved.positions - atoms.positions).max() > 1e-3


@pytest.mark.parametrize("file", ["single", "multihead"])
def test_torch_sim(exported, file):
    ts = pytest.importorskip("torch_sim", reason="torch-sim is not installed (pip install 'mace-mf[md]')")
    from torch_sim.models.mace import MaceModel

    model = MaceModel(torch.load(exported[file], weights_only=False), device=torch.device("cpu"), dtype=torch.float64)
    starts = [start(name) for name in MOLECULES]
    for atoms in starts:
        atoms.center(vacuum=6.0)
    final = ts.integrate(
        system=starts, model=model, integrator=ts.nvt_langevin, n_steps=100, temperature=300.0, timestep=0.0005
    )
    results = model(final)
    per_system = final.system_idx if hasattr(final, "system_idx") else final.batch
    for k, atoms in enumerate(starts):
        moved = atoms.copy()
        moved.positions = final.positions[per_system == k].detach().numpy()
        energy, forces = reference(exported["single"], moved)
        assert float(results["energy"][k]) == pytest.approx(energy, rel=1e-6)
        np.testing.assert_allclose(results["forces"][per_system == k].detach().numpy(), forces, rtol=1e-6, atol=1e-8)
        assert np.abs(moved.positions - atoms.positions).max() > 1e-3


@pytest.mark.skipif(
    not os.environ.get("MACE_MF_LMP"),
    reason="MACE_MF_LMP is not set to a LAMMPS built with ML-MACE (ACEsuit's fork; scripts/lammps_check.py says how)",
)
def test_lammps_runs_the_exported_file_as_the_stock_calculator(exported, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "lammps_check.py"
    out = tmp_path / "lammps"
    args = ["--lmp", os.environ["MACE_MF_LMP"], "--run", str(exported["run"]), "--out", str(out), "--molecules", "2"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["passed"] and len(results["each"]) == 4
    assert results["worst"]["forces_eV_per_A"] < 1e-7
