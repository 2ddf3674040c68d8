"""Reading files into labelled configurations: per-fidelity labels and the checks they pass.

One geometry may carry labels of any subset of fidelities (PM6 forces *and* a CCSD(T) energy);
whatever is missing is None here and masked later, never filled in. Labels are read from
``atoms.info`` / ``atoms.arrays`` or, failing that, from an attached calculator's results (ASE moves
``energy``/``forces`` of extxyz files there). Every bad label or geometry is a one-line error naming
the file and the configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms

from mace_mf.config.schema import FidelitySpec
from mace_mf.errors import DataError

MIN_DISTANCE = 0.1  # Å: closer atoms are a broken geometry, not chemistry


@dataclass
class Labels:
    """Per-fidelity labels of one configuration (None where absent)."""

    energy: list[float | None]
    forces: list[np.ndarray | None]


def read_atoms(path: str, fmt: str | None) -> list[Atoms]:
    """All configurations of one ASE-readable file, with a one-line error when it cannot be read."""
    file = Path(path)
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


def check_geometry(atoms: Atoms, where: str) -> None:
    """Refuse geometries that no potential should be fitted to."""
    if len(atoms) < 2:
        raise DataError(f"{where}: a configuration with {len(atoms)} atom(s); isolated atoms are fixed by E0s, drop it")
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    np.fill_diagonal(distances, np.inf)
    closest = float(distances.min())
    if closest < MIN_DISTANCE:
        raise DataError(f"{where}: atoms {closest:.3f} Å apart (< {MIN_DISTANCE} Å); fix or drop the configuration")


@dataclass
class Frame:
    """A configuration read from a file with its validated labels."""

    atoms: Atoms
    labels: Labels


def read_frames(paths: str | list[str], specs: dict[str, FidelitySpec], fmt: str | None) -> list[Frame]:
    """All configurations of the given files, labels validated, geometry checked."""
    frames: list[Frame] = []
    for path in [paths] if isinstance(paths, str) else paths:
        for i, atoms in enumerate(read_atoms(path, fmt)):
            where = f"{path}: configuration {i}"
            check_geometry(atoms, where)
            frames.append(Frame(atoms, read_labels(atoms, specs, where)))
    return frames


def check_declared_keys(
    frames: list[Frame], specs: dict[str, FidelitySpec], what: str, scored: Sequence[Frame] = ()
) -> None:
    """A declared key that no configuration carries is a typo, not a masked label.

    ``scored``: validation/test frames, where forces that are only scored (``forces_weight: 0``,
    e.g. high-level forces computed for the test split alone) may be the only ones."""
    for h, (name, spec) in enumerate(specs.items()):
        if spec.energy_key is not None and not any(f.labels.energy[h] is not None for f in frames):
            raise DataError(
                f"{what}: fidelities.{name}.energy_key {spec.energy_key!r} is in no configuration; "
                "check the key (atoms.info) or set it to null"
            )
        pool = list(frames) if spec.forces_weight > 0 else [*frames, *scored]
        if spec.forces_key is not None and not any(f.labels.forces[h] is not None for f in pool):
            trained = (
                f" (forces_weight {spec.forces_weight} trains on them; with energies only, set forces_key: null "
                "or forces_weight: 0)"
                if spec.forces_weight > 0
                else ""
            )
            raise DataError(
                f"{what}: fidelities.{name}.forces_key {spec.forces_key!r} is in no configuration; "
                f"check the key (atoms.arrays) or set it to null{trained}"
            )
