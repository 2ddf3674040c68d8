"""Is an exported model safe to run MD with? Short NVE trajectories that look for the usual failures.

A potential can fit its test set and still blow up in dynamics: holes in the energy surface pull
atoms together, a wrong repulsion lets a molecule fly apart, a non-conservative or rough surface
makes the total energy drift. Each structure gets a short velocity-Verlet run (ASE, NVE, seeded
Maxwell-Boltzmann velocities) with the stock ``MACECalculator`` -- exactly what a user will run --
and the trajectory is scored on:

- energy drift: slope of the total energy per atom over time (eV/atom/ps), by least squares;
- maximum force seen (eV/Å) and whether every energy and force stayed finite;
- bond stretch: the largest relative elongation of the pairs bonded in the starting geometry
  (distance below 1.2x the sum of covalent radii);
- atoms flying apart: an atom with a neighbour within the model's cutoff at the start and none later;
- collapse: two atoms closer than ``min_distance``.

A structure passes when every test passes; the whole check passes when every structure does. A
trajectory stops at its first structural failure (non-finite, force, stretch, flying apart,
collapse): what follows would only fling atoms further. Drift is a least-squares slope, so it needs
a trajectory long enough to average the velocity-Verlet energy oscillation out (~100 steps).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units
from ase.data import covalent_radii
from ase.geometry import find_mic
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet
from ase.neighborlist import neighbor_list

from mace_mf.config.schema import MDOptions
from mace_mf.data.read import read_atoms
from mace_mf.data.store import check_geometry
from mace_mf.errors import DataError
from mace_mf.files import atomic_write_text
from mace_mf.model.build import resolve_device
from mace_mf.model.foundation import load_model_file
from mace_mf.model.heads import head_names

log = logging.getLogger(__name__)

BOND_FACTOR = 1.2  # bonded: closer than 1.2 x (sum of covalent radii), ASE's natural-cutoff convention


@dataclass
class StructureResult:
    """The verdict on one structure's trajectory."""

    index: int
    formula: str
    n_atoms: int
    steps_run: int
    drift_eV_atom_ps: float | None
    max_energy_change_eV_atom: float | None
    max_force_eV_A: float | None
    max_bond_stretch: float | None
    min_distance_A: float | None
    flown_apart: list[int]
    finite: bool
    passed: bool = False
    reasons: list[str] = field(default_factory=list)


def bonded_pairs(atoms: Atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) bonded in ``atoms`` and their distances (minimum image under PBC)."""
    radii = covalent_radii[atoms.numbers] * BOND_FACTOR
    cutoff = float(2 * radii.max()) if len(atoms) else 0.0
    i, j, d = neighbor_list("ijd", atoms, cutoff)
    keep = (i < j) & (d < radii[i] + radii[j])
    return i[keep], j[keep], d[keep]


def pair_distances(atoms: Atoms, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    vectors = atoms.positions[j] - atoms.positions[i]
    if atoms.pbc.any():
        vectors, _ = find_mic(vectors, atoms.cell, atoms.pbc)
    return np.linalg.norm(vectors, axis=1)


def _contacts(atoms: Atoms, r_max: float) -> tuple[np.ndarray, float]:
    """Neighbours of each atom within ``r_max`` and the closest distance (inf if none within it).

    Small non-periodic systems use a dense distance matrix: ASE's binned neighbour list would build
    a grid over the bounding box, which explodes when an atom has been shot far away.
    """
    n = len(atoms)
    if not atoms.pbc.any() and n <= 1000:
        distances = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
        np.fill_diagonal(distances, np.inf)
        return (distances < r_max).sum(axis=1), float(distances.min()) if n > 1 else float("inf")
    i, d = neighbor_list("id", atoms, r_max)
    return np.bincount(i, minlength=n), float(d.min()) if len(d) else float("inf")


def run_structure(
    atoms: Atoms, calc: Any, r_max: float, options: MDOptions, index: int, seed: int = 0
) -> StructureResult:
    """One NVE trajectory from ``atoms`` (velocities seeded by ``seed`` and ``index``), scored."""
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng([seed, index])
    MaxwellBoltzmannDistribution(atoms, temperature_K=options.temperature_K, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any() and (atoms.get_moments_of_inertia() > 1e-8).all():
        ZeroRotation(atoms)  # not for linear molecules: their singular inertia tensor gives NaN velocities
    bi, bj, d0 = bonded_pairs(atoms)
    counts, min_distance = _contacts(atoms, r_max)
    had_neighbours = counts > 0
    n = len(atoms)
    times, totals = [], []
    max_force, max_stretch = 0.0, 0.0
    flown: set[int] = set()
    finite = True
    dyn = VelocityVerlet(atoms, timestep=options.dt_fs * units.fs)

    def observe() -> bool:
        """Record the current step; False once the trajectory has failed beyond doubt."""
        nonlocal max_force, max_stretch, min_distance, finite
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        if not (np.isfinite(energy) and np.isfinite(forces).all()):
            finite = False
            return False
        times.append(dyn.get_time() / (1000 * units.fs))  # ps
        totals.append((energy + atoms.get_kinetic_energy()) / n)
        max_force = max(max_force, float(np.linalg.norm(forces, axis=1).max()))
        if len(bi):
            max_stretch = max(max_stretch, float((pair_distances(atoms, bi, bj) / d0 - 1.0).max()))
        counts, closest = _contacts(atoms, r_max)
        min_distance = min(min_distance, closest)
        flown.update(np.flatnonzero(had_neighbours & (counts == 0)).tolist())
        # Stop at a structural failure: later steps only fling atoms further and cost time.
        return not (
            flown
            or max_force > options.max_force
            or max_stretch > options.max_bond_stretch
            or min_distance < options.min_distance
        )

    going = observe()
    steps_run = 0
    while going and steps_run < options.steps:
        dyn.run(1)
        steps_run += 1
        going = observe()
    drift = float(np.polyfit(times, totals, 1)[0]) if len(times) > 2 else None
    change = float(np.max(np.abs(np.array(totals) - totals[0]))) if totals else None
    result = StructureResult(
        index=index,
        formula=atoms.get_chemical_formula(),
        n_atoms=n,
        steps_run=steps_run,
        drift_eV_atom_ps=drift,
        max_energy_change_eV_atom=change,
        max_force_eV_A=max_force if totals else None,
        max_bond_stretch=max_stretch if len(bi) else None,
        min_distance_A=min_distance if np.isfinite(min_distance) else None,
        flown_apart=sorted(flown),
        finite=finite,
    )
    result.reasons = _reasons(result, options)
    result.passed = not result.reasons
    return result


def _reasons(r: StructureResult, o: MDOptions) -> list[str]:
    reasons = []
    if not r.finite:
        reasons.append(f"non-finite energy or forces after {r.steps_run} steps")
    if r.drift_eV_atom_ps is not None and abs(r.drift_eV_atom_ps) > o.max_drift:
        reasons.append(f"energy drift {r.drift_eV_atom_ps:.3g} eV/atom/ps (limit {o.max_drift:g})")
    if r.max_force_eV_A is not None and r.max_force_eV_A > o.max_force:
        reasons.append(f"force {r.max_force_eV_A:.3g} eV/Å (limit {o.max_force:g})")
    if r.max_bond_stretch is not None and r.max_bond_stretch > o.max_bond_stretch:
        reasons.append(f"a bond stretched by {100 * r.max_bond_stretch:.0f}% (limit {100 * o.max_bond_stretch:.0f}%)")
    if r.flown_apart:
        reasons.append(f"atoms {r.flown_apart[:5]} flew out of the cutoff")
    if r.min_distance_A is not None and r.min_distance_A < o.min_distance:
        reasons.append(f"atoms {r.min_distance_A:.2f} Å apart (limit {o.min_distance:g} Å)")
    return reasons


def summary_line(results: list[StructureResult]) -> str:
    failed = [r for r in results if not r.passed]
    if not failed:
        return f"md-check PASS: {len(results)}/{len(results)} structures stable"
    first = failed[0]
    return (
        f"md-check FAIL: {len(failed)}/{len(results)} structures unstable; "
        f"structure {first.index} ({first.formula}): {'; '.join(first.reasons)}"
    )


def md_check(
    model: torch.nn.Module,
    structures: list[Atoms],
    head: str | None,
    options: MDOptions,
    seed: int = 0,
    source: str = "model",
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the check with stock ``MACECalculator`` (float64, on ``device``) on a copy of ``model``;
    return the JSON-ready record."""
    from mace.calculators import MACECalculator

    names = head_names(model)
    if head is None and len(names) > 1:
        raise DataError(f"{source} has heads {names}; choose one with --head")
    if head is not None and head not in names:
        raise DataError(f"--head {head!r}: not a head of {source} (heads: {names}); choose one of them")
    # The calculator converts dtype and freezes parameters in place: give it a copy. It also logs
    # "Using CPU"-style lines on the root logger, which would interleave with ours.
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        calc = MACECalculator(
            models=copy.deepcopy(model).double().to(device),
            device=device,
            default_dtype="float64",
            head=head or names[0],
        )
    finally:
        logging.disable(previous)
    r_max = float(model.r_max)
    results = [run_structure(atoms, calc, r_max, options, i, seed) for i, atoms in enumerate(structures)]
    return {
        "model": source,
        "head": head or names[0],
        "options": {**options.model_dump(), "seed": seed},
        "structures": [asdict(r) for r in results],
        "passed": all(r.passed for r in results),
        "summary": summary_line(results),
    }


def md_check_file(
    model_or_run: Path,
    structures: Path,
    head: str | None,
    options: MDOptions,
    seed: int,
    limit: int | None,
    out: Path,
    device: str = "cpu",
) -> dict[str, Any]:
    """``mace-mf md-check``: the check of a model file (or a run's multi-head model) from the first
    ``limit`` geometries of a structures file, written to ``out``; the record."""
    frames = read_atoms(str(structures), None)[:limit]
    for i, atoms in enumerate(frames):
        check_geometry(atoms, f"{structures}: configuration {i}")
    model, _ = load_model_file(model_or_run)
    record = md_check(model, frames, head, options, seed, source=str(model_or_run), device=str(resolve_device(device)))
    record["structures_file"] = str(structures)
    write_md_check(record, out)
    return record


def write_md_check(record: dict[str, Any], path: Path) -> Path:
    atomic_write_text(path, json.dumps(record, indent=2))
    return path


def md_check_markdown(record: dict[str, Any]) -> list[str]:
    """Report lines: the summary and a table per structure."""
    o = record["options"]
    lines = [
        f"{o['steps']} NVE steps of {o['dt_fs']} fs from {o['temperature_K']:g} K, head `{record['head']}`, "
        "stock `MACECalculator`.",
        "",
        f"**{record['summary']}**",
        "",
        "| structure | atoms | drift (eV/atom/ps) | max force (eV/Å) | max bond stretch | min distance (Å) | result |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for s in record["structures"]:
        verdict = "pass" if s["passed"] else "FAIL: " + "; ".join(s["reasons"])
        stretch = "–" if s["max_bond_stretch"] is None else f"{100 * s['max_bond_stretch']:.0f}%"
        lines.append(
            f"| {s['index']} {s['formula']} | {s['n_atoms']} | {fmt(s['drift_eV_atom_ps'], '.2e')} | "
            f"{fmt(s['max_force_eV_A'], '.2f')} | {stretch} | {fmt(s['min_distance_A'], '.2f')} | "
            f"{verdict} |"
        )
    return lines
