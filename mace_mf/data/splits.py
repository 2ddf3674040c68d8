"""Which geometries and labels a recipe trains, selects and scores on: reading, holding out,
label subsets and the graphs built once per run.

:func:`select_frames` is the one definition of a recipe's data; the upstream comparison arm writes
its files from it, so both tools see the same configurations and labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mace.tools import AtomicNumberTable

from mace_mf.config.schema import FidelitySpec, Recipe
from mace_mf.data.graphs import Split, make_split
from mace_mf.data.pairs import Pairs, read_pairs
from mace_mf.data.read import Frame, check_declared_keys, read_frames
from mace_mf.data.selection import select
from mace_mf.errors import RecipeError
from mace_mf.model.foundation import FoundationInfo, check_elements

log = logging.getLogger(__name__)

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


Frames = tuple[list[Frame], list[Frame], list[Frame] | None]


def select_frames(recipe: Recipe, info: FoundationInfo, foundation: torch.nn.Module | None = None) -> Frames:
    """Read, check and split the data into (train, valid, test) frames, label subsets applied.

    The one definition of which geometries and labels a recipe trains, selects and scores on;
    the upstream comparison arm (mace_mf.workflows.upstream) writes its files from it. ``foundation`` (its
    starting head) chooses the geometries of a ``label_selection`` other than ``random``.
    """
    specs = recipe.fidelities
    d = recipe.data
    train = read_frames(d.train, specs, d.format)
    # Fractions are of the whole training file, so test and valid sizes do not depend on each other.
    total = len(train)
    test: list[Frame] | None = None
    if d.test is not None:
        test = read_frames(d.test, specs, d.format)
    elif d.test_fraction > 0:
        train, test = split_off(train, max(1, round(d.test_fraction * total)), recipe.seed, salt=2)
    if d.valid is not None:
        valid = read_frames(d.valid, specs, d.format)
    else:
        if d.valid_fraction <= 0:
            raise RecipeError("data.valid: no validation file and data.valid_fraction is 0; give one of them")
        train, valid = split_off(train, max(1, round(d.valid_fraction * total)), recipe.seed, salt=1)
    if not train:
        raise RecipeError("data: valid_fraction + test_fraction leave no training configurations; lower them")
    check_declared_keys(train, specs, "data.train", [*valid, *(test or [])])
    if d.max_train is not None and len(train) > d.max_train:
        train, _ = split_off(train, len(train) - d.max_train, recipe.seed, salt=3)
    for name, frames in (("data.train", train), ("data.valid", valid), ("data.test", test or [])):
        zs = {int(z) for f in frames for z in f.atoms.numbers}
        check_elements(info, zs, name)
    subsample_labels(train, specs, recipe.seed, label_chooser(recipe, train, foundation))
    target = recipe.target
    t = list(specs).index(target)
    if not any(f.labels.energy[t] is not None or f.labels.forces[t] is not None for f in valid):
        raise RecipeError(
            f"training.target: fidelity {target!r} has no labels in the validation data; "
            "label it there or choose another target"
        )
    return train, valid, test


def label_chooser(recipe: Recipe, train: list[Frame], model: torch.nn.Module | None) -> Chooser | None:
    """The chooser of mace_mf.data.selection for ``label_selection`` (fps, kmeans, disagreement) with ``model``."""
    if model is None:
        return None
    names = list(recipe.fidelities)

    def choose(h: int, labelled: list[int], count: int) -> list[int]:
        spec = recipe.fidelities[names[h]]
        low_forces = None
        if spec.label_selection == "disagreement":
            low = spec.base or next((n for n in names if n != names[h] and recipe.fidelities[n].forces_key), None)
            if low is None:
                raise RecipeError(
                    f"fidelities.{names[h]}.label_selection: disagreement needs a base fidelity with forces"
                )
            low_forces = [train[i].labels.forces[names.index(low)] for i in labelled]
        atoms = [train[i].atoms for i in labelled]
        picked = select(atoms, count, spec.label_selection, recipe.seed, model, low_forces)
        log.info(
            "fidelities.%s: %s chose %d of %d training geometries", names[h], spec.label_selection, count, len(labelled)
        )
        return [labelled[i] for i in picked]

    return choose


def data_elements(info: FoundationInfo, frames: Frames) -> tuple[int, ...]:
    """The foundation's elements that occur in any split, in the foundation's order."""
    seen = {int(z) for split in frames if split for f in split for z in f.atoms.numbers}
    return tuple(z for z in info.atomic_numbers if z in seen)


def load_splits(recipe: Recipe, info: FoundationInfo, dtype: torch.dtype, frames: Frames | None = None) -> Splits:
    """Read, check and split the data (unless ``frames`` are given); build graphs once for the run."""
    specs = recipe.fidelities
    train, valid, test = frames or select_frames(recipe, info)
    z_table = AtomicNumberTable(list(info.atomic_numbers))
    heads = list(specs)
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
    return Splits(
        make_split("train", train, heads, z_table, info.r_max, dtype),
        make_split("valid", valid, heads, z_table, info.r_max, dtype),
        make_split("test", test, heads, z_table, info.r_max, dtype) if test else None,
        pairs,
    )
