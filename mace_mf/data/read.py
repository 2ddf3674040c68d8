"""Reading configurations as ASE atoms with per-fidelity labels: small inputs (displacement pairs,
MD starting structures, selection pools) that commands hold whole. A store (:mod:`mace_mf.data.store`)
is accepted wherever a file is; the training data go through stores and their label tables instead
(:mod:`mace_mf.data.table`).

Labels are read from ``atoms.info`` / ``atoms.arrays`` or, failing that, from an attached
calculator's results (ASE moves ``energy``/``forces`` of extxyz files there). Every bad label or
geometry is a one-line error naming the file and the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms

from mace_mf.config.schema import FidelitySpec
from mace_mf.data.store import PLAN, Store, source_kind
from mace_mf.errors import DataError


@dataclass
class Labels:
    """Per-fidelity labels of one configuration (None where absent)."""

    energy: list[float | None]
    forces: list[np.ndarray | None]


def read_atoms(path: str, fmt: str | None) -> list[Atoms]:
    """All configurations of one ASE-readable file or store, with a one-line error when it cannot be read."""
    file = Path(path)
    if file.is_dir() and (source_kind(file, fmt) == "store" or (file / PLAN).is_file()):
        store = Store(file)
        return [store.atoms(i) for i in range(len(store))]
    if not file.is_file():
        raise DataError(f"{path}: data file not found; check data.* in the recipe")
    if file.stat().st_size == 0:
        raise DataError(f"{path}: empty file, no configurations in the file; give a file with at least one")
    try:
        frames = ase.io.read(file, index=":", format=fmt)
    except Exception as exc:  # ASE raises many types for a bad file; all mean "cannot parse"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read as {fmt or 'a guessed ASE format'} ({reason}); set data.format") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise DataError(f"{path}: no configurations in the file")
    return frames


def _lookup(atoms: Atoms, key: str, per_atom: bool) -> object | None:
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    if atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        return atoms.calc.results[key]
    return None


def read_labels(atoms: Atoms, specs: dict[str, FidelitySpec], where: str) -> Labels:
    """Every fidelity's labels of one configuration, validated (finite, right shape)."""
    energies: list[float | None] = []
    forces: list[np.ndarray | None] = []
    for name, spec in specs.items():
        energy = None if spec.energy_key is None else _lookup(atoms, spec.energy_key, per_atom=False)
        if energy is not None:
            try:
                energy = float(np.asarray(energy).reshape(()))
            except (TypeError, ValueError):
                raise DataError(
                    f"{where}: {spec.energy_key} ({name}) is not a single number; give one number in eV"
                ) from None
            if not np.isfinite(energy):
                raise DataError(f"{where}: {spec.energy_key} ({name}) is {energy}; fix or drop the configuration")
        value = None if spec.forces_key is None else _lookup(atoms, spec.forces_key, per_atom=True)
        if value is not None:
            array = np.asarray(value, dtype=float)
            if array.shape != (len(atoms), 3):
                raise DataError(
                    f"{where}: {spec.forces_key} ({name}) has shape {array.shape}, expected ({len(atoms)}, 3); "
                    "store one x, y, z row per atom"
                )
            if not np.isfinite(array).all():
                raise DataError(f"{where}: {spec.forces_key} ({name}) contains NaN/inf; fix or drop the configuration")
            value = array
        energies.append(energy)
        forces.append(value)
    return Labels(energies, forces)
