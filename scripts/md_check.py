"""A short MD stability check of an exported model through stock ``MACECalculator``.

Runs NVE (velocity Verlet) from velocities drawn at ``--temperature`` and reports what goes wrong
first in an unstable potential: total-energy drift, a changed covalent bond graph (a broken or
formed bond), atoms that come too close, runaway temperature. Prints one JSON object; exits 1
when the check fails, so it can gate a benchmark.

    python scripts/md_check.py runs/ethanol/mf/models/pbe.model runs/ethanol_mf_data/test.xyz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.data import covalent_radii
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet


def bond_graph(atoms: Atoms, scale: float = 1.25) -> np.ndarray:
    radii = covalent_radii[atoms.numbers]
    bonded = atoms.get_all_distances() < scale * (radii[:, None] + radii[None, :])
    np.fill_diagonal(bonded, False)
    return bonded


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a .model file (single- or multi-head)")
    parser.add_argument("structure", type=Path, help="ASE-readable file; its first configuration starts the MD")
    parser.add_argument("--head", default=None, help="head of a multi-head model")
    parser.add_argument("--temperature", type=float, default=300.0, help="initial velocities (K)")
    parser.add_argument("--time-ps", type=float, default=1.0, help="simulated time (ps)")
    parser.add_argument("--timestep-fs", type=float, default=0.5, help="time step (fs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial velocities")
    parser.add_argument("--max-drift", type=float, default=5.0, help="allowed |E_tot drift| (meV/atom)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import mace  # noqa: F401  (before e3nn)
    from mace.calculators import MACECalculator

    atoms = ase.io.read(args.structure, index=0)
    atoms.calc = MACECalculator(
        model_paths=str(args.model), device="cpu", default_dtype="float64", **({"head": args.head} if args.head else {})
    )
    rng = np.random.default_rng(args.seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    reference = bond_graph(atoms)
    dyn = VelocityVerlet(atoms, timestep=args.timestep_fs * units.fs)
    steps = round(args.time_ps * 1000 / args.timestep_fs)
    totals, temperatures, closest, bonds_kept = [], [], np.inf, True

    def record() -> None:
        nonlocal closest, bonds_kept
        totals.append(atoms.get_total_energy())
        temperatures.append(atoms.get_temperature())
        distances = atoms.get_all_distances()
        np.fill_diagonal(distances, np.inf)
        closest = min(closest, float(distances.min()))
        bonds_kept = bonds_kept and bool(np.array_equal(bond_graph(atoms), reference))

    started = time.perf_counter()
    record()
    dyn.attach(record, interval=10)
    dyn.run(steps)
    wall = time.perf_counter() - started
    total = np.array(totals)
    drift = 1000 * (total[-1] - total[0]) / len(atoms)
    spread = 1000 * (total.max() - total.min()) / len(atoms)
    result = {
        "model": str(args.model),
        "head": args.head,
        "steps": steps,
        "time_ps": args.time_ps,
        "timestep_fs": args.timestep_fs,
        "initial_temperature_K": args.temperature,
        "mean_temperature_K": round(float(np.mean(temperatures)), 1),
        "max_temperature_K": round(float(np.max(temperatures)), 1),
        "energy_drift_meV_atom": round(float(drift), 3),
        "energy_spread_meV_atom": round(float(spread), 3),
        "closest_distance_A": round(closest, 3),
        "bond_graph_kept": bonds_kept,
        "wall_s": round(wall, 1),
    }
    result["stable"] = bool(bonds_kept and abs(drift) <= args.max_drift and np.isfinite(total).all())
    print(json.dumps(result))
    return 0 if result["stable"] else 1


if __name__ == "__main__":
    sys.exit(main())
