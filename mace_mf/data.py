"""Reading files into labelled configurations: per-fidelity labels, masks, splits and batches.

One geometry may carry labels of any subset of fidelities (PM6 forces *and* a CCSD(T) energy);
whatever is missing is masked, never filled in. Each configuration becomes one graph (mace's
``AtomicData``: neighbour list built once per run) plus four label tensors that batch naturally:

- ``mf_energy`` ``[1, H]`` and ``mf_energy_mask`` ``[1, H]`` (graph level),
- ``mf_forces`` ``[n_atoms, H, 3]`` (node level) and ``mf_forces_mask`` ``[1, H]`` (graph level).

Labels are read from ``atoms.info`` / ``atoms.arrays`` or, failing that, from an attached
calculator's results (ASE moves ``energy``/``forces`` of extxyz files there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase import Atoms
from mace.data import AtomicData
from mace.data.utils import Configuration
from mace.tools import AtomicNumberTable
from mace.tools.torch_geometric import Batch, DataLoader

from mace_mf.errors import DataError
from mace_mf.recipe import FidelitySpec

MIN_DISTANCE = 0.1  # Å: closer atoms are a broken geometry, not chemistry


@dataclass
class Labels:
    """Per-fidelity labels of one configuration (None where absent)."""

    energy: list[float | None]
    forces: list[np.ndarray | None]


@dataclass
class Split:
    """One split (train/valid/test): graphs plus the label table used for E0 fits and metrics."""

    name: str
    fidelities: list[str]
    atoms: list[Atoms]
    graphs: list[AtomicData] = field(repr=False)

    def __len__(self) -> int:
        return len(self.graphs)

    def energy_mask(self) -> np.ndarray:
        """``[n_configs, H]`` bool: which configurations carry which fidelity's energy."""
        if not self.graphs:
            return np.zeros((0, len(self.fidelities)), dtype=bool)
        return torch.cat([g.mf_energy_mask for g in self.graphs]).bool().numpy()

    def energies(self) -> np.ndarray:
        if not self.graphs:
            return np.zeros((0, len(self.fidelities)))
        return torch.cat([g.mf_energy for g in self.graphs]).double().numpy()

    def counts(self, z_table: AtomicNumberTable) -> np.ndarray:
        """``[n_configs, n_elements]`` element counts in the model's element order."""
        if not self.graphs:
            return np.zeros((0, len(z_table.zs)))
        return torch.stack([g.node_attrs.sum(0) for g in self.graphs]).double().numpy()

    def label_variances(self) -> tuple[np.ndarray, np.ndarray]:
        """Per fidelity: variance of energy per atom left after a per-element linear fit
        (eV²/atom²), and mean square force component (eV²/Å²); NaN where unlabelled.

        These are the scales at which a loss term is "large" for that fidelity, whatever its
        units or absolute reference.
        """
        n_heads = len(self.fidelities)
        e_var, f_var = np.full(n_heads, np.nan), np.full(n_heads, np.nan)
        if not self.graphs:
            return e_var, f_var
        counts = torch.stack([g.node_attrs.sum(0) for g in self.graphs]).double().numpy()
        labels, e_mask = self.energies(), self.energy_mask()
        natoms = counts.sum(1)
        for h in range(n_heads):
            sel = e_mask[:, h]
            if sel.sum() > 1:
                coef, *_ = np.linalg.lstsq(counts[sel], labels[sel, h], rcond=None)
                e_var[h] = float(np.var((labels[sel, h] - counts[sel] @ coef) / natoms[sel]))
            forces = [g.mf_forces[:, h] for g in self.graphs if bool(g.mf_forces_mask[0, h])]
            if forces:
                f_var[h] = float(torch.cat(forces).double().square().mean())
        return e_var, f_var

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """Batches in file order, or in a permutation fixed by ``seed`` (e.g. seed and epoch)."""
        order: Sequence[int] = range(len(self.graphs))
        if shuffle:
            order = torch.randperm(len(self.graphs), generator=torch.Generator().manual_seed(seed)).tolist()
        return DataLoader([self.graphs[i] for i in order], batch_size=batch_size, shuffle=False, drop_last=False)


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


def to_graph(
    atoms: Atoms, labels: Labels, z_table: AtomicNumberTable, r_max: float, heads: list[str], dtype: torch.dtype
) -> AtomicData:
    """One configuration as a graph with label tensors and masks attached."""
    config = Configuration(
        atomic_numbers=atoms.numbers.copy(),
        positions=atoms.positions.copy(),
        properties={},
        property_weights={},
        cell=np.asarray(atoms.cell.array),
        pbc=tuple(bool(p) for p in atoms.pbc),
        head=heads[0],
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        graph = AtomicData.from_config(config, z_table=z_table, cutoff=r_max, heads=heads)
    finally:
        torch.set_default_dtype(previous)
    num_heads, n = len(heads), len(atoms)
    energy = torch.zeros(1, num_heads, dtype=dtype)
    energy_mask = torch.zeros(1, num_heads, dtype=dtype)
    forces = torch.zeros(n, num_heads, 3, dtype=dtype)
    forces_mask = torch.zeros(1, num_heads, dtype=dtype)
    for h in range(num_heads):
        if labels.energy[h] is not None:
            energy[0, h], energy_mask[0, h] = labels.energy[h], 1.0
        if labels.forces[h] is not None:
            forces[:, h] = torch.as_tensor(labels.forces[h], dtype=dtype)
            forces_mask[0, h] = 1.0
    graph.mf_energy, graph.mf_energy_mask = energy, energy_mask
    graph.mf_forces, graph.mf_forces_mask = forces, forces_mask
    return graph


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


Chooser = Callable[[int, list[int], int], Sequence[int]]


def subsample_labels(
    frames: list[Frame], specs: dict[str, FidelitySpec], seed: int, choose: Chooser | None = None
) -> None:
    """Keep each fidelity's labels on only its ``label_fraction`` of the frames: a seeded random
    draw, or ``choose(fidelity index, labelled frame indices, count)`` for its ``label_selection``."""
    for h, spec in enumerate(specs.values()):
        if spec.label_fraction >= 1.0:
            continue
        labelled = [i for i, f in enumerate(frames) if f.labels.energy[h] is not None or f.labels.forces[h] is not None]
        keep_n = max(1, round(spec.label_fraction * len(labelled)))
        if spec.label_selection != "random" and choose is not None:
            keep = set(choose(h, labelled, keep_n))
        else:
            rng = np.random.default_rng([seed, h, 7919])
            keep = set(rng.choice(labelled, size=keep_n, replace=False).tolist())
        for i in labelled:
            if i not in keep:
                frames[i].labels.energy[h] = None
                frames[i].labels.forces[h] = None


def split_off(frames: list[Frame], count: int, seed: int, salt: int) -> tuple[list[Frame], list[Frame]]:
    """Hold out ``count`` of ``frames`` with a seeded permutation: (kept, held_out)."""
    if count <= 0:
        return frames, []
    order = np.random.default_rng([seed, salt]).permutation(len(frames))
    held = set(order[:count].tolist())
    return [f for i, f in enumerate(frames) if i not in held], [f for i, f in enumerate(frames) if i in held]


def make_split(
    name: str, frames: list[Frame], heads: list[str], z_table: AtomicNumberTable, r_max: float, dtype: torch.dtype
) -> Split:
    graphs = [to_graph(f.atoms, f.labels, z_table, r_max, heads, dtype) for f in frames]
    return Split(name, heads, [f.atoms for f in frames], graphs)


def graphs_for_model(frames: Sequence[Atoms], model: torch.nn.Module, n_heads: int) -> list[AtomicData]:
    """Unlabelled graphs of ``frames`` built with the model's own element table, cutoff and dtype
    (every label masked): for predictions that need no label, such as pair centres or descriptors."""
    empty = Labels([None] * n_heads, [None] * n_heads)
    names = [str(h) for h in range(n_heads)]
    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    dtype = next(model.parameters()).dtype
    return [to_graph(a, empty, z_table, float(model.r_max), names, dtype) for a in frames]


def batch_dict(batch: Batch) -> dict[str, torch.Tensor]:
    """The batch as the plain dict that mace's modules index (positions get a fresh leaf)."""
    data = batch.to_dict()
    data["positions"] = data["positions"].detach().clone()
    return data
