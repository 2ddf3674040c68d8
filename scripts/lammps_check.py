"""Run an exported ``<fidelity>.model-lammps.pt`` in LAMMPS and hold it to the stock MACECalculator.

    python scripts/lammps_check.py --lmp /path/to/lmp --run runs/quickstart --out runs/lammps-check

LAMMPS with ``pair_style mace`` is ACEsuit's fork (https://github.com/ACEsuit/lammps, branch
``mace``) built with ``-DPKG_ML-MACE=ON`` against libtorch (``-DCMAKE_PREFIX_PATH`` =
``python -c "import torch; print(torch.utils.cmake_prefix_path)"``, C++17); it is not on PyPI, so
this is a script for a machine that has it, not a test. A serial build (``-DBUILD_MPI=OFF``) of that
branch stops at ``MPI_Comm_split_type`` in ``pair_mace.cpp``, which the MPI stubs lack: it picks the
GPU of the local rank, so for a serial CPU build ``int localrank = 0;`` in its place is enough.

For each of ``--molecules`` test configurations of the run
(and each in two boxes: one with vacuum beyond the cutoff, one so tight that the molecule sees its
periodic images, which exercises the image shifts ``no_domain_decomposition`` computes), it:

1. exports the run's fidelity with ``mace-mf export --lammps`` (the single-head file beside it);
2. has LAMMPS compute energy and forces (``run 0``) and compares them with ``MACECalculator`` on the
   single-head file;
3. runs ``--steps`` steps of NVE from the same velocities in LAMMPS and in ASE's VelocityVerlet with
   ``MACECalculator`` and compares the end positions, and the range of the total energy in each
   (LAMMPS should conserve it exactly as well as ASE does with the same model and step).

Results in ``<out>/results.json`` and ``<out>/results.md``; the exit status is 1 if any comparison is
outside its tolerance.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from ase import Atoms, units
from ase.io import read
from ase.io.lammpsdata import write_lammps_data
from ase.md.verlet import VelocityVerlet

ROOT = Path(__file__).resolve().parents[1]
TIMESTEP_FS = 0.5
TOLERANCE = {"energy_eV": 1e-7, "forces_eV_per_A": 1e-7, "md_positions_A": 1e-5}


def lammps_input(model: Path, species: list[str], periodic: bool, steps: int) -> str:
    """A LAMMPS input: single point, then NVE with the data file's velocities (metal units)."""
    boundary = "p p p" if periodic else "f f f"
    return f"""units metal
atom_style atomic
atom_modify map yes
newton on
boundary {boundary}
read_data system.data
pair_style mace no_domain_decomposition
pair_coeff * * {model} {" ".join(species)}
thermo_style custom step pe ke etotal
thermo_modify format float %.15g
thermo 1
dump start all custom 1 start.dump id element x y z fx fy fz
dump_modify start sort id element {" ".join(species)} format float %.15g
run 0
undump start
timestep {TIMESTEP_FS / 1000}
fix nve all nve
run {steps}
write_dump all custom end.dump id x y z modify sort id format float %.15g
"""


def thermo_rows(log: str) -> np.ndarray:
    """The ``step pe ke etotal`` rows LAMMPS printed."""
    rows = re.findall(r"^\s*(\d+)\s+(-?[\d.eE+-]+)\s+(-?[\d.eE+-]+)\s+(-?[\d.eE+-]+)\s*$", log, flags=re.M)
    return np.array(rows, dtype=float)


def dump_columns(path: Path, names: list[str]) -> np.ndarray:
    """Columns of a LAMMPS custom dump (one frame), rows sorted by atom id."""
    lines = path.read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("ITEM: ATOMS"))
    columns = lines[header].split()[2:]
    table = [line.split() for line in lines[header + 1 :] if line.strip()]
    return np.array([[float(row[columns.index(n)]) for n in names] for row in table])


def check_one(
    atoms: Atoms, lmp: str, lammps_model: Path, calculator, species: list[str], work: Path, steps: int
) -> dict[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    kt = 300 * units.kB
    momenta = np.random.default_rng(0).normal(size=(len(atoms), 3)) * np.sqrt(atoms.get_masses() * kt)[:, None]
    atoms.set_momenta(momenta - momenta.sum(axis=0) * (atoms.get_masses() / atoms.get_masses().sum())[:, None])
    with open(work / "system.data", "w") as handle:
        write_lammps_data(handle, atoms, specorder=species, masses=True, velocities=True, units="metal")
    periodic = bool(atoms.pbc.all())
    (work / "in.lammps").write_text(lammps_input(lammps_model.resolve(), species, periodic, steps))
    done = subprocess.run([lmp, "-in", "in.lammps", "-log", "log.lammps"], cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{work}: LAMMPS failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    thermo = thermo_rows((work / "log.lammps").read_text())

    reference = atoms.copy()
    reference.calc = calculator
    energy = reference.get_potential_energy()
    forces = reference.get_forces()
    lammps_forces = dump_columns(work / "start.dump", ["fx", "fy", "fz"])

    dynamics = VelocityVerlet(reference, timestep=TIMESTEP_FS * units.fs)
    ase_total: list[float] = []
    dynamics.attach(lambda: ase_total.append(reference.get_total_energy()), interval=1)
    dynamics.run(steps)
    end = dump_columns(work / "end.dump", ["x", "y", "z"])
    moved = end - reference.positions  # LAMMPS wraps periodic atoms back into the box; compare modulo the cell
    if periodic:
        fractional = np.linalg.solve(reference.cell.array.T, moved.T).T
        moved = (fractional - np.round(fractional)) @ reference.cell.array
    etotal = thermo[len(thermo) - steps - 1 :, 3]
    return {
        "atoms": len(atoms),
        "mace_energy_eV": energy,
        "energy_eV": abs(float(thermo[0, 1]) - energy),
        "forces_eV_per_A": float(np.abs(lammps_forces - forces).max()),
        "md_positions_A": float(np.abs(moved).max()),
        "md_energy_drift_eV_per_atom": float(np.abs(etotal - etotal[0]).max() / len(atoms)),
        "ase_energy_drift_eV_per_atom": float(np.abs(np.subtract(ase_total, ase_total[0])).max() / len(atoms)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lmp", required=True, help="the LAMMPS executable (built with ML-MACE)")
    parser.add_argument("--run", type=Path, required=True, help="a finished mace-mf train run folder")
    parser.add_argument("--fidelity", help="which head (default: the run's training target)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--molecules", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    ctx = parser.parse_args()

    import mace  # noqa: F401  (before e3nn)
    from mace.calculators import MACECalculator

    from mace_mf.run_folder import RunFolder

    tree = yaml.safe_load(RunFolder(ctx.run).resolved_recipe.read_text())
    fidelity = ctx.fidelity or tree["training"].get("target") or list(tree["fidelities"])[-1]
    models = ctx.out / "models"
    export = [sys.executable, "-m", "mace_mf.cli", "export", str(ctx.run), "--out", str(models), "--lammps"]
    subprocess.run([*export, "--fidelity", fidelity], check=True, cwd=ROOT)
    lammps_model = models / f"{fidelity}.model-lammps.pt"
    calculator = MACECalculator(model_paths=str(models / f"{fidelity}.model"), device="cpu", default_dtype="float64")

    test = tree["data"].get("test") or tree["data"]["valid"]
    configs = read(test if isinstance(test, str) else test[0], f":{ctx.molecules}")
    species = sorted({s for a in configs for s in a.get_chemical_symbols()})
    results: dict[str, dict[str, float]] = {}
    for i, molecule in enumerate(configs):
        molecule.calc = None
        for box, padding in (("vacuum", 2 * 6.0 + 4.0), ("tight", 3.0)):
            atoms = molecule.copy()
            atoms.center(vacuum=padding / 2)
            atoms.pbc = True
            results[f"{i}-{atoms.get_chemical_formula()}-{box}"] = check_one(
                atoms, ctx.lmp, lammps_model, calculator, species, ctx.out / f"{i}-{box}", ctx.steps
            )
    drifts = ("md_energy_drift_eV_per_atom", "ase_energy_drift_eV_per_atom")
    worst = {k: max(r[k] for r in results.values()) for k in (*TOLERANCE, *drifts)}
    energies = {k: r["mace_energy_eV"] for k, r in results.items()}
    images = max(abs(energies[k] - energies[k.replace("-tight", "-vacuum")]) for k in energies if k.endswith("-tight"))
    passed = all(worst[k] <= tol for k, tol in TOLERANCE.items())
    (ctx.out / "results.json").write_text(json.dumps({"worst": worst, "passed": passed, "each": results}, indent=2))
    lines = [
        f"`{' '.join(sys.argv)}`: fidelity {fidelity}, {ctx.steps} NVE steps of {TIMESTEP_FS} fs",
        "",
        "| system | atoms | |ΔE| (eV) | max |ΔF| (eV/Å) | max |Δx| after MD (Å) | E_tot range LAMMPS / ASE (eV/atom) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {k} | {r['atoms']} | {r['energy_eV']:.1e} | {r['forces_eV_per_A']:.1e} | "
            f"{r['md_positions_A']:.1e} | "
            f"{r['md_energy_drift_eV_per_atom']:.1e} / {r['ase_energy_drift_eV_per_atom']:.1e} |"
            for k, r in results.items()
        ),
        "",
        f"periodic images change the tight boxes' energy by up to {images:.2g} eV (so their shifts are exercised)",
        f"tolerances {TOLERANCE}: {'passed' if passed else 'FAILED'}",
    ]
    (ctx.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
