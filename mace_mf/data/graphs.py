"""Configurations as graphs: mace's ``AtomicData`` plus per-fidelity label tensors and masks.

Each configuration becomes one graph (neighbour list built once per run) carrying four label tensors
that batch naturally:

- ``mf_energy`` ``[1, H]`` and ``mf_energy_mask`` ``[1, H]`` (graph level),
- ``mf_forces`` ``[n_atoms, H, 3]`` (node level) and ``mf_forces_mask`` ``[1, H]`` (graph level).

A :class:`Split` holds one split's graphs and the label tables that E0 fits and metrics read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from ase import Atoms
from mace.data import AtomicData
from mace.data.utils import Configuration
from mace.tools import AtomicNumberTable
from mace.tools.torch_geometric import Batch, DataLoader

from mace_mf.data.read import Frame, Labels


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
