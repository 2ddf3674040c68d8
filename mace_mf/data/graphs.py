"""Configurations as graphs: mace's ``AtomicData`` plus per-fidelity label tensors and masks, and the
batches a split yields.

Each configuration becomes one graph carrying four label tensors that batch naturally:

- ``mf_energy`` ``[1, H]`` and ``mf_energy_mask`` ``[1, H]`` (graph level),
- ``mf_forces`` ``[n_atoms, H, 3]`` (node level) and ``mf_forces_mask`` ``[1, H]`` (graph level).

A :class:`Split` is one split's label table (:mod:`mace_mf.data.table`) and the recipe of its graphs.
Its graphs are either built once and kept (small data: fast epochs, memory grows with the data,
about 37 kB per 11-atom geometry) or built from the store each time a batch needs them, by
``training.num_workers`` DataLoader worker processes (flat memory: what a million geometries need).
Both give the same graphs in the same batches, so a run's numbers do not depend on the choice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from mace.data import AtomicData
from mace.data.utils import Configuration
from mace.tools import AtomicNumberTable
from mace.tools.torch_geometric import Batch
from torch.utils.data import DataLoader, Dataset, Sampler

from mace_mf.data.read import Labels
from mace_mf.data.table import LabelTable

# Kept graphs of a split are estimated at this many bytes per atom (37 kB per 11-atom geometry,
# measured on pyseqm_chno with the SPICE foundation's 4.5 Å cutoff).
GRAPH_BYTES_PER_ATOM = 3400
KEEP_GRAPHS_BYTES = 2 << 30  # `data.keep_graphs: auto` keeps a split's graphs below this estimate


def make_graph(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    energies: Sequence[float | None],
    forces: Sequence[np.ndarray | None],
    z_table: AtomicNumberTable,
    r_max: float,
    heads: list[str],
    dtype: torch.dtype,
) -> AtomicData:
    """One configuration as a graph with label tensors and masks attached."""
    config = Configuration(
        atomic_numbers=np.asarray(numbers),
        positions=np.asarray(positions),
        properties={},
        property_weights={},
        cell=np.asarray(cell),
        pbc=tuple(bool(p) for p in pbc),
        head=heads[0],
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        graph = AtomicData.from_config(config, z_table=z_table, cutoff=r_max, heads=heads)
    finally:
        torch.set_default_dtype(previous)
    num_heads, n = len(heads), len(numbers)
    energy = torch.zeros(1, num_heads, dtype=dtype)
    energy_mask = torch.zeros(1, num_heads, dtype=dtype)
    force_labels = torch.zeros(n, num_heads, 3, dtype=dtype)
    forces_mask = torch.zeros(1, num_heads, dtype=dtype)
    for h in range(num_heads):
        if energies[h] is not None:
            energy[0, h], energy_mask[0, h] = energies[h], 1.0
        if forces[h] is not None:
            force_labels[:, h] = torch.as_tensor(forces[h], dtype=dtype)
            forces_mask[0, h] = 1.0
    graph.mf_energy, graph.mf_energy_mask = energy, energy_mask
    graph.mf_forces, graph.mf_forces_mask = force_labels, forces_mask
    return graph


def to_graph(
    atoms: Atoms, labels: Labels, z_table: AtomicNumberTable, r_max: float, heads: list[str], dtype: torch.dtype
) -> AtomicData:
    """:func:`make_graph` of ASE atoms."""
    return make_graph(
        atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, labels.energy, labels.forces,
        z_table, r_max, heads, dtype,
    )  # fmt: skip


def masked(graph: AtomicData) -> AtomicData:
    """A copy of ``graph`` with every label masked: it trains nothing, so a rank with no data can
    step, and energy-only predictions skip the forces."""
    clone = copy.copy(graph)
    clone.mf_energy_mask = torch.zeros_like(graph.mf_energy_mask)
    clone.mf_forces_mask = torch.zeros_like(graph.mf_forces_mask)
    return clone


@dataclass(frozen=True)
class GraphRecipe:
    """How a split's configurations become graphs: the model's elements, cutoff and dtype, the head
    names, and each fidelity's forces key in the stores."""

    z_table: AtomicNumberTable
    r_max: float
    heads: list[str]
    dtype: torch.dtype
    forces_keys: tuple[str | None, ...]


class Split:
    """One split (train/valid/test): its label table and its graphs, kept or built on demand."""

    def __init__(self, name: str, table: LabelTable, recipe: GraphRecipe, keep: bool) -> None:
        self.name = name
        self.table = table
        self.recipe = recipe
        self.fidelities = list(recipe.heads)
        self.graphs: list[AtomicData] | None = [self.build(i) for i in range(len(table))] if keep else None

    def __len__(self) -> int:
        return len(self.table)

    def build(self, i: int) -> AtomicData:
        """The graph of position ``i``, read from the store."""
        t, r = self.table, self.recipe
        wanted = [key for h, key in enumerate(r.forces_keys) if key is not None and t.forces_mask[i, h]]
        record = t.configs.record(int(t.rows[i]), (), wanted)
        energies = [float(t.energies[i, h]) if t.energy_mask[i, h] else None for h in range(len(r.heads))]
        forces = [
            record.arrays[key] if key is not None and t.forces_mask[i, h] else None
            for h, key in enumerate(r.forces_keys)
        ]
        return make_graph(
            record.numbers, record.positions, record.cell, record.pbc, energies, forces,
            r.z_table, r.r_max, r.heads, r.dtype,
        )  # fmt: skip

    def graph(self, i: int) -> AtomicData:
        return self.graphs[i] if self.graphs is not None else self.build(i)

    def subset(self, positions: np.ndarray, name: str | None = None) -> Split:
        """The split of ``positions`` (kept graphs are shared, not rebuilt)."""
        part = Split.__new__(Split)
        part.name, part.recipe, part.fidelities = name or self.name, self.recipe, self.fidelities
        part.table = self.table.take(positions)
        part.graphs = [self.graphs[int(p)] for p in positions] if self.graphs is not None else None
        return part

    def energies(self) -> np.ndarray:
        return self.table.energies

    def energy_mask(self) -> np.ndarray:
        return self.table.energy_mask

    def natoms(self) -> np.ndarray:
        return self.table.n_atoms.astype(float)

    def counts(self, z_table: AtomicNumberTable) -> np.ndarray:
        """``[n_configs, n_elements]`` element counts in the model's element order."""
        return self.table.configs.element_counts(self.table.rows, z_table.zs)

    def atoms(self, i: int) -> Atoms:
        return self.table.configs.atoms(int(self.table.rows[i]))

    def forces(self, i: int, h: int) -> np.ndarray | None:
        """Fidelity ``h``'s force labels of position ``i`` (None where it has none)."""
        key = self.recipe.forces_keys[h]
        if key is None or not self.table.forces_mask[i, h]:
            return None
        return self.table.configs.record(int(self.table.rows[i]), (), [key]).arrays[key]

    def label_variances(self) -> tuple[np.ndarray, np.ndarray]:
        """Per fidelity: variance of energy per atom left after a per-element linear fit
        (eV²/atom²), and mean square force component (eV²/Å²); NaN where unlabelled.

        These are the scales at which a loss term is "large" for that fidelity, whatever its
        units or absolute reference.
        """
        n_heads = len(self.fidelities)
        e_var, f_var = np.full(n_heads, np.nan), np.full(n_heads, np.nan)
        if not len(self):
            return e_var, f_var
        counts = self.counts(self.recipe.z_table)
        labels, e_mask = self.energies(), self.energy_mask()
        natoms = counts.sum(1)
        for h in range(n_heads):
            sel = e_mask[:, h]
            if sel.sum() > 1:
                coef, *_ = np.linalg.lstsq(counts[sel], labels[sel, h], rcond=None)
                e_var[h] = float(np.var((labels[sel, h] - counts[sel] @ coef) / natoms[sel]))
            squares, components = 0.0, 0
            for i in np.flatnonzero(self.table.forces_mask[:, h]):
                forces = self.forces(int(i), h)
                squares += float(np.square(forces).sum())
                components += forces.size
            if components:
                f_var[h] = squares / components
        return e_var, f_var

    def loader(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        workers: int = 0,
        steps: int | None = None,
        shard: tuple[int, int] = (0, 1),
        pin_memory: bool = False,
        persistent: bool = False,
        riders: np.ndarray | None = None,
    ) -> DataLoader:
        """Batches in file order, or in a permutation fixed by ``seed`` (e.g. seed and epoch); at most
        ``steps`` of them; ``shard`` ``(rank, world)`` takes this rank's contiguous share of each
        batch; ``riders`` (positions) are spread over the others' batches (:class:`Batches`). Graphs
        not kept are built by ``workers`` processes (0: this one); ``persistent`` keeps those
        processes from one pass to the next (reseed with ``loader.batch_sampler.seed``)."""
        sampler = Batches(len(self), batch_size, shuffle, seed, steps, shard, riders)
        workers = 0 if self.graphs is not None else workers
        return DataLoader(
            _Graphs(self),
            batch_sampler=sampler,
            collate_fn=Batch.from_data_list,
            num_workers=workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if workers else None,
            persistent_workers=persistent and workers > 0,
        )


class _Graphs(Dataset):
    """A split's graphs by position; ``-(p + 1)`` is position ``p``'s graph with every label masked
    (the padding a rank with an empty share of a batch trains on)."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> AtomicData:
        return masked(self.split.graph(-i - 1)) if i < 0 else self.split.graph(i)


class Batches(Sampler[list[int]]):
    """Positions batch by batch: in order, or the permutation ``torch.randperm(n, seed)``; each batch
    cut to this rank's contiguous share (sizes differing by at most one) when ``world`` > 1; the
    first ``steps`` batches only, when given.

    ``riders``: positions that do not make batches of their own but are shared out over the batches
    of the others (in order, or their own permutation), sizes differing by at most one. Replay
    geometries ride so (``replay.ride_along``): an epoch takes as many optimiser steps as the
    fine-tuning data alone, and every step sees both.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        steps: int | None = None,
        shard: tuple[int, int] = (0, 1),
        riders: np.ndarray | None = None,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.seed, self.steps = n, batch_size, shuffle, seed, steps
        self.rank, self.world = shard
        self.riders = np.zeros(0, dtype=np.int64) if riders is None else np.asarray(riders, dtype=np.int64)
        if len(self.riders) >= n:
            raise ValueError("riders: every position rides, so no batch would carry them")
        # once, not every epoch: an O(n log n) set difference over a million positions
        self.drivers = np.setdiff1d(np.arange(n), self.riders, assume_unique=True) if len(self.riders) else np.arange(n)

    def _order(self, positions: np.ndarray, stream: int) -> np.ndarray:
        if not self.shuffle:
            return positions
        generator = torch.Generator().manual_seed(self.seed + stream)
        return positions[torch.randperm(len(positions), generator=generator).numpy()]

    def __len__(self) -> int:
        batches = -(-len(self.drivers) // self.batch_size)
        return batches if self.steps is None else min(batches, self.steps)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order(self.drivers, 0)
        total = -(-len(self.drivers) // self.batch_size)
        shares = np.array_split(self._order(self.riders, 1), total) if len(self.riders) else None
        for step in range(len(self)):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            if shares is not None:
                batch = np.concatenate([batch, shares[step]])
            if self.world > 1:
                base, extra = divmod(len(batch), self.world)
                start = self.rank * base + min(self.rank, extra)
                mine = batch[start : start + base + (1 if self.rank < extra else 0)]
                yield [int(i) for i in mine] if len(mine) else [-int(batch[0]) - 1]
            else:
                yield [int(i) for i in batch]


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
