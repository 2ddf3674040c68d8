"""Per-fidelity label tables: which configurations carry which labels, and their energies.

A table is a few numbers per configuration (``[n, H]`` energies and two masks), read column by
column from the stores (a million geometries with three fidelities: about 30 MB), so every decision
that needs only these (splits, label subsets, declared-key checks, E0 fits, metrics) is made without
touching positions or forces. Forces stay in the stores and are read per configuration when a graph
is built.

Missing labels are masked, never filled in. Checks that name the key and the configuration at fault:
an energy label that is text, a forces array whose rows are not x, y, z, a declared key that no
configuration carries (a typo).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mace_mf.config.schema import FidelitySpec
from mace_mf.data.store import Configurations
from mace_mf.errors import DataError


@dataclass
class LabelTable:
    """Labels of configurations ``rows`` of ``configs``: energies ``[n, H]`` (NaN where absent) and which
    configurations carry each fidelity's energy and forces."""

    configs: Configurations
    rows: np.ndarray  # int64 [n]: rows of ``configs``
    energies: np.ndarray  # float64 [n, H]
    energy_mask: np.ndarray  # bool [n, H]
    forces_mask: np.ndarray  # bool [n, H]
    n_atoms: np.ndarray  # int [n]

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> LabelTable:
        """The table of a subset (positions into this table, in that order)."""
        p = np.asarray(positions, dtype=np.int64)
        return LabelTable(
            self.configs,
            self.rows[p],
            self.energies[p],
            self.energy_mask[p],
            self.forces_mask[p],
            self.n_atoms[p],
        )

    def labelled(self, h: int) -> np.ndarray:
        """Positions of the configurations that carry any label of fidelity ``h``."""
        return np.flatnonzero(self.energy_mask[:, h] | self.forces_mask[:, h])

    def drop(self, h: int, positions: np.ndarray) -> None:
        """Mask fidelity ``h``'s labels at ``positions`` (a label subset)."""
        self.energy_mask[positions, h] = False
        self.forces_mask[positions, h] = False
        self.energies[positions, h] = np.nan


def _energies(configs: Configurations, key: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    kind = configs.info_kind(key)
    n = len(configs)
    if kind is None:
        return np.full(n, np.nan), np.zeros(n, dtype=bool)
    values, present = configs.info_column(key)
    if kind["kind"] == "bool" or any(shape != () for shape in kind["shapes"]) or values.ndim > 1:
        row = int(np.flatnonzero(present)[0])
        raise DataError(f"{configs.where(row)}: {key} ({name}) is not a single number; give one number in eV")
    if values.dtype.kind == "O":
        numbers = np.full(n, np.nan)
        for row in np.flatnonzero(present):
            try:
                numbers[row] = float(values[row])
            except (TypeError, ValueError):
                raise DataError(
                    f"{configs.where(int(row))}: {key} ({name}) is not a single number; give one number in eV"
                ) from None
        values = numbers
    return np.where(present, values.astype(float), np.nan), present


def _forces_mask(configs: Configurations, key: str, name: str) -> np.ndarray:
    shapes = configs.array_shapes(key)
    if not shapes:
        return np.zeros(len(configs), dtype=bool)
    mask = configs.array_mask(key)
    if shapes != {(3,)}:
        row = int(np.flatnonzero(mask)[0])
        (shape,) = [s for s in shapes if s != (3,)][:1] or [next(iter(shapes))]
        raise DataError(
            f"{configs.where(row)}: {key} ({name}) has rows of shape {shape}, expected (3,); "
            "store one x, y, z row per atom"
        )
    return mask


def label_table(configs: Configurations, specs: dict[str, FidelitySpec]) -> LabelTable:
    """Every fidelity's labels over all configurations of ``configs``, checked."""
    n, heads = len(configs), len(specs)
    energies = np.full((n, heads), np.nan)
    energy_mask = np.zeros((n, heads), dtype=bool)
    forces_mask = np.zeros((n, heads), dtype=bool)
    for h, (name, spec) in enumerate(specs.items()):
        if spec.energy_key is not None:
            energies[:, h], energy_mask[:, h] = _energies(configs, spec.energy_key, name)
        if spec.forces_key is not None:
            forces_mask[:, h] = _forces_mask(configs, spec.forces_key, name)
    return LabelTable(configs, np.arange(n, dtype=np.int64), energies, energy_mask, forces_mask, configs.n_atoms())


def _nearest(key: str, known: set[str]) -> str:
    """`` (did you mean 'x'?)`` for the stored key nearest a misspelt one, or nothing."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_declared_keys(
    table: LabelTable, specs: dict[str, FidelitySpec], what: str, scored: Sequence[LabelTable] = ()
) -> None:
    """A declared key that no configuration carries is a typo, not a masked label: the error names the
    stored key nearest it.

    ``scored``: validation/test tables, where labels that are only scored (weight 0, e.g. high-level
    forces computed for the test split alone, or a replay level only measured) may be the only ones."""
    info_keys = {k for s in table.configs.stores for k in s.manifest["info"]}
    array_keys = {k for s in table.configs.stores for k in s.manifest["arrays"]}
    for h, (name, spec) in enumerate(specs.items()):
        energy_pool = [table] if spec.energy_weight > 0 else [table, *scored]
        if spec.energy_key is not None and not any(t.energy_mask[:, h].any() for t in energy_pool):
            raise DataError(
                f"{what}: fidelities.{name}.energy_key {spec.energy_key!r} is in no configuration"
                f"{_nearest(spec.energy_key, info_keys)}; check the key (atoms.info) or set it to null"
            )
        pool = [table] if spec.forces_weight > 0 else [table, *scored]
        elsewhere = any(t.forces_mask[:, h].any() for t in scored)
        if spec.forces_key is not None and spec.forces_weight > 0 and not table.forces_mask[:, h].any() and elsewhere:
            raise DataError(
                f"{what}: fidelities.{name}.forces_key {spec.forces_key!r} is only in the validation/test data, "
                f"and forces_weight {spec.forces_weight} would train on it; set fidelities.{name}.forces_weight: 0 "
                "to score those forces without training on them"
            )
        if spec.forces_key is not None and not any(t.forces_mask[:, h].any() for t in pool):
            trained = (
                f" (forces_weight {spec.forces_weight} trains on them; with energies only, set forces_key: null "
                "or forces_weight: 0)"
                if spec.forces_weight > 0
                else ""
            )
            raise DataError(
                f"{what}: fidelities.{name}.forces_key {spec.forces_key!r} is in no configuration"
                f"{_nearest(spec.forces_key, array_keys)}; check the key (atoms.arrays) or set it to null{trained}"
            )
