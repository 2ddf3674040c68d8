"""Which configurations and labels a recipe trains, selects and scores on: stores opened, validation
and test held out, label subsets chosen, and each split's graphs set up for the run.

:func:`select_data` is the one definition of a recipe's data; the upstream comparison arm writes its
files from it, so both tools see the same configurations and labels. Everything here works on row
indices and label tables, never on every configuration at once: the same code serves ten geometries
and a million.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mace.tools import AtomicNumberTable

from mace_mf.config.schema import REPLAY_FIDELITY, FidelitySpec, Recipe
from mace_mf.data.graphs import GRAPH_BYTES_PER_ATOM, KEEP_GRAPHS_BYTES, GraphRecipe, Split
from mace_mf.data.pairs import Pairs, read_pairs
from mace_mf.data.selection import select
from mace_mf.data.store import cache_root, open_configurations
from mace_mf.data.table import LabelTable, check_declared_keys, label_table
from mace_mf.errors import RecipeError
from mace_mf.model.foundation import FoundationInfo, check_elements

log = logging.getLogger(__name__)

# choose(fidelity index, positions of the labelled training configurations, how many to keep)
Chooser = Callable[[int, np.ndarray, int], Sequence[int]]


@dataclass
class Selected:
    """A recipe's configurations: the label tables of its train, valid and (optional) test splits."""

    train: LabelTable
    valid: LabelTable
    test: LabelTable | None

    def tables(self) -> dict[str, LabelTable]:
        named = {"train": self.train, "valid": self.valid}
        if self.test is not None:
            named["test"] = self.test
        return named


@dataclass
class Splits:
    train: Split
    valid: Split
    test: Split | None
    pairs: Pairs | None = None  # displacement pairs of validation geometries, scored with valid

    def named(self) -> dict[str, Split]:
        result = {"train": self.train, "valid": self.valid}
        if self.test is not None:
            result["test"] = self.test
        return result


def split_off(n: int, count: int, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``count`` of ``n`` positions with a seeded permutation: (kept, held out), each in
    their original order."""
    if count <= 0:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng([seed, salt]).permutation(n)
    held = np.zeros(n, dtype=bool)
    held[order[:count]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def subsample_labels(table: LabelTable, recipe: Recipe, choose: Chooser | None = None) -> None:
    """Keep each fidelity's labels on only its ``label_fraction`` of the configurations that carry
    them: a seeded random draw, or ``choose`` for its ``label_selection``."""
    for h, spec in enumerate(recipe.fidelities.values()):
        if spec.label_fraction >= 1.0:
            continue
        labelled = table.labelled(h)
        keep_n = max(1, round(spec.label_fraction * len(labelled)))
        if spec.label_selection != "random" and choose is not None:
            keep = np.asarray(list(choose(h, labelled, keep_n)), dtype=np.int64)
        else:
            rng = np.random.default_rng([recipe.seed, h, 7919])
            keep = rng.choice(labelled, size=keep_n, replace=False)
        table.drop(h, np.setdiff1d(labelled, keep))


def _store_cache(recipe: Recipe) -> Path:
    return cache_root(recipe.data.store_cache)


def split_tables(recipe: Recipe) -> Selected:
    """Open, check and split the data into train, valid and test label tables, before any label subset.

    Fractions are of the whole training file, so test and valid sizes do not depend on each other.
    Needs no model: what a benchmark reads to know which labels its arms can train on.
    """
    specs, d = recipe.fidelities, recipe.data
    cache, workers = _store_cache(recipe), d.preprocess_workers
    train = label_table(open_configurations(d.train, d.format, cache, workers), specs)
    total = len(train)
    test: LabelTable | None = None
    if d.test is not None:
        test = label_table(open_configurations(d.test, d.format, cache, workers), specs)
    elif d.test_fraction > 0:
        kept, held = split_off(len(train), max(1, round(d.test_fraction * total)), recipe.seed, salt=2)
        train, test = train.take(kept), train.take(held)
    if d.valid is not None:
        valid = label_table(open_configurations(d.valid, d.format, cache, workers), specs)
    else:
        if d.valid_fraction <= 0:
            raise RecipeError("data.valid: no validation file and data.valid_fraction is 0; give one of them")
        kept, held = split_off(len(train), max(1, round(d.valid_fraction * total)), recipe.seed, salt=1)
        train, valid = train.take(kept), train.take(held)
    if not len(train):
        raise RecipeError("data: valid_fraction + test_fraction leave no training configurations; lower them")
    check_declared_keys(train, specs, "data.train", [valid, *([test] if test is not None else [])])
    replayed = replay_only(train, specs)
    if d.max_train is not None and len(train) - replayed.sum() > d.max_train:
        core = np.flatnonzero(~replayed)  # the replay set is not fine-tuning data: never cut with it
        kept, _ = split_off(len(core), len(core) - d.max_train, recipe.seed, salt=3)
        train = train.take(np.sort(np.concatenate([core[kept], np.flatnonzero(replayed)])))
    return Selected(train, valid, test)


def weighed_rows(table: LabelTable, specs: dict[str, FidelitySpec]) -> np.ndarray:
    """Which rows carry a label that some loss term weighs (energy or force weight > 0, or the
    base's forces where a head takes them as a prior).

    The others add nothing to a batch but its cost, and a batch of only them would still take an
    optimiser step (Adam moves on its momentum with zero gradients): a run on the high-level
    energies alone must train as one given only the geometries that carry them."""
    names = list(specs)
    weighed = np.zeros(len(table), dtype=bool)
    for h, spec in enumerate(specs.values()):
        if spec.energy_weight > 0:
            weighed |= table.energy_mask[:, h]
        if spec.forces_weight > 0:
            weighed |= table.forces_mask[:, h]
        if spec.base is not None and spec.base_forces_weight > 0:
            weighed |= table.forces_mask[:, names.index(spec.base)]
    return weighed


def replay_only(table: LabelTable, specs: dict[str, FidelitySpec]) -> np.ndarray:
    """Which rows carry the replay fidelity's labels and no other (mace_mf.workflows.replay)."""
    if REPLAY_FIDELITY not in specs:
        return np.zeros(len(table), dtype=bool)
    h = list(specs).index(REPLAY_FIDELITY)
    labelled = table.energy_mask | table.forces_mask
    return labelled[:, h] & ~np.delete(labelled, h, axis=1).any(axis=1)


def select_data(recipe: Recipe, info: FoundationInfo, foundation: torch.nn.Module | None = None) -> Selected:
    """:func:`split_tables`, the foundation's elements checked, label subsets applied.

    ``foundation`` (its starting head) chooses the geometries of a ``label_selection`` other than
    ``random``.
    """
    selected = split_tables(recipe)
    checked: set[int] = set()
    for name, table in selected.tables().items():
        if id(table.configs) not in checked:  # a split held out of the training file is checked with it
            checked.add(id(table.configs))
            check_elements(info, table.configs.elements, f"data.{name}")
    subsample_labels(selected.train, recipe, label_chooser(recipe, selected.train, foundation))
    weighed = weighed_rows(selected.train, recipe.fidelities)
    if weighed.any() and not weighed.all():
        log.info(
            "data.train: %d of %d configurations carry a label the loss weighs (weight > 0); only they are trained on",
            weighed.sum(),
            len(weighed),
        )
        selected.train = selected.train.take(np.flatnonzero(weighed))
    t = list(recipe.fidelities).index(recipe.target)
    if not len(selected.valid.labelled(t)):
        raise RecipeError(
            f"training.target: fidelity {recipe.target!r} has no labels in the validation data; "
            "label it there or choose another target"
        )
    return selected


def label_chooser(recipe: Recipe, train: LabelTable, model: torch.nn.Module | None) -> Chooser | None:
    """The chooser of :mod:`mace_mf.data.selection` for ``label_selection`` (fps, kmeans,
    disagreement) with ``model``; it reads the labelled geometries it chooses from."""
    if model is None:
        return None
    names = list(recipe.fidelities)

    def choose(h: int, labelled: np.ndarray, count: int) -> list[int]:
        spec = recipe.fidelities[names[h]]
        configs = train.configs
        atoms = [configs.atoms(int(train.rows[p])) for p in labelled]
        low_forces = None
        if spec.label_selection == "disagreement":
            low = spec.base or next((n for n in names if n != names[h] and recipe.fidelities[n].forces_key), None)
            if low is None:
                raise RecipeError(
                    f"fidelities.{names[h]}.label_selection: disagreement needs a base fidelity with forces"
                )
            key, low_h = recipe.fidelities[low].forces_key, names.index(low)
            low_forces = [
                configs.record(int(train.rows[p]), (), [key]).arrays[key] if train.forces_mask[p, low_h] else None
                for p in labelled
            ]
        picked = select(atoms, count, spec.label_selection, recipe.seed, model, low_forces)
        log.info(
            "fidelities.%s: %s chose %d of %d training geometries", names[h], spec.label_selection, count, len(labelled)
        )
        return [int(labelled[i]) for i in picked]

    return choose


def data_elements(info: FoundationInfo, selected: Selected) -> tuple[int, ...]:
    """The foundation's elements that occur in any split, in the foundation's order."""
    seen: set[int] = set()
    for table in selected.tables().values():
        if len(table) == len(table.configs):  # every configuration of the files: their elements
            seen |= table.configs.elements
        else:  # a subset (held out, or max_train): the elements of its own rows
            counts = table.configs.element_counts(table.rows, list(info.atomic_numbers))
            seen |= {z for z, used in zip(info.atomic_numbers, counts.sum(0) > 0, strict=True) if used}
    return tuple(z for z in info.atomic_numbers if z in seen)


def statistics_sample(split: Split, recipe: Recipe, purpose: str) -> Split:
    """``split``, or a seeded sample of ``data.statistics_sample`` of its configurations (in their
    order) where it holds more: what the E0 fit, the label variances and the training metrics read."""
    size = recipe.data.statistics_sample
    if size is None or len(split) <= size:
        return split
    positions = np.sort(np.random.default_rng([recipe.seed, 5381]).choice(len(split), size=size, replace=False))
    log.info(
        "data.statistics_sample: %s reads %d of %d %s configurations (seeded)", purpose, size, len(split), split.name
    )
    return split.subset(positions)


def keep_graphs(recipe: Recipe, table: LabelTable) -> bool:
    """``data.keep_graphs``: hold a split's graphs in memory (``auto``: when they fit in 2 GiB)."""
    setting = recipe.data.keep_graphs
    if setting != "auto":
        return bool(setting)
    return int(table.n_atoms.sum()) * GRAPH_BYTES_PER_ATOM < KEEP_GRAPHS_BYTES


def load_splits(recipe: Recipe, info: FoundationInfo, dtype: torch.dtype, selected: Selected | None = None) -> Splits:
    """The run's splits (selecting the data unless ``selected`` is given) and validation pairs."""
    specs = recipe.fidelities
    selected = selected or select_data(recipe, info)
    graph_recipe = GraphRecipe(
        AtomicNumberTable(list(info.atomic_numbers)),
        info.r_max,
        list(specs),
        dtype,
        tuple(spec.forces_key for spec in specs.values()),
    )
    splits = {
        name: Split(name, table, graph_recipe, keep_graphs(recipe, table)) for name, table in selected.tables().items()
    }
    for name, split in splits.items():
        log.info(
            "data.%s: %d configurations, graphs %s",
            name,
            len(split),
            "kept in memory" if split.graphs is not None else "built from the store as batches need them",
        )
    pairs = None
    if recipe.data.valid_pairs is not None:
        pairs = read_pairs(recipe.data.valid_pairs, specs, recipe.data.format)
        check_elements(info, {int(z) for a in pairs.centres for z in a.numbers}, "data.valid_pairs")
        if not np.isfinite(pairs.reference).any():
            keys = ", ".join(f"{s.energy_key}" for s in specs.values() if s.energy_key)
            raise RecipeError(
                f"data.valid_pairs: no pair carries energies of a fidelity ({keys}) on both halves; "
                "label them with mace-mf label --energies-only"
            )
    return Splits(splits["train"], splits["valid"], splits.get("test"), pairs)
