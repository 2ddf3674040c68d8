"""Everything a run does before its first training step: the foundation loaded, labels computed,
replay geometries chosen and labelled (mace_mf.workflows.replay), the data read and split, the model
built (mace_mf.model.build) and each head's E0s fitted.

Runs, every rank of a torchrun run, bench arms and sweep trials prepare through :func:`prepare`;
the speed benchmark calls its steps one by one to time them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.data import atomic_numbers as symbol_to_z
from ase.data import chemical_symbols
from mace.modules.models import ScaleShiftMACE
from mace.tools import AtomicNumberTable

from mace_mf.config.schema import Recipe
from mace_mf.data.graphs import Split
from mace_mf.data.splits import Splits, data_elements, load_splits, select_data, statistics_sample
from mace_mf.errors import RecipeError
from mace_mf.evaluation.predict import predict
from mace_mf.labels.labelling import label_recipe_data
from mace_mf.model.build import build_model, torch_dtype
from mace_mf.model.cueq import to_cueq
from mace_mf.model.foundation import FoundationInfo, keep_elements, load_foundation
from mace_mf.model.heads import extract_head, fit_e0s, set_head_e0s
from mace_mf.train.distributed import SINGLE, Dist, rank0_first
from mace_mf.workflows.replay import replay_recipe

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A model ready to train and what it was made from."""

    model: ScaleShiftMACE
    info: FoundationInfo  # the foundation as kept (its elements cut to the data's unless `elements: all`)
    splits: Splits
    e0s: dict[str, dict[str, float]]  # fitted E0s by fidelity and element
    labelled_files: dict[str, Any]  # files labelled for `fidelities.<name>.labels`, by fidelity
    recipe: Recipe  # what the run trains: computed labels' files, and the replay fidelity where `replay:` asks


def prepare(recipe: Recipe, cache_dir: Path, device: torch.device, dist: Dist = SINGLE) -> Prepared:
    """Foundation → labels → data → model → E0s. ``cache_dir`` holds computed labels."""
    dtype = torch_dtype(recipe.dtype)
    with rank0_first(dist):  # a named foundation is downloaded once
        foundation, info = load_foundation(recipe.foundation.model, recipe.foundation.head, dtype)
    log.info(
        "foundation %s: %d parameters, r_max %.2f Å, elements %s",
        info.source,
        info.num_parameters,
        info.r_max,
        " ".join(info.elements),
    )
    with rank0_first(dist):  # rank 0 labels (and chooses replay geometries) into the cache, the others read it
        data_recipe, labelled_files = label_recipe_data(recipe, cache_dir)
        data_recipe = replay_recipe(
            data_recipe, extract_head(foundation, info.head), set(info.atomic_numbers), cache_dir
        )
    single, info, splits = start_head(data_recipe, foundation, info, dtype)
    log.info(
        "data: %d train, %d valid, %d test configurations",
        len(splits.train),
        len(splits.valid),
        len(splits.test) if splits.test else 0,
    )
    model = build_model(single, data_recipe).to(device)
    e0s = assign_e0s(model, single, data_recipe, splits.train, device)
    if recipe.training.cueq:
        model = to_cueq(model)
        log.info("training.cueq: the model trains with cuEquivariance kernels; exported files are e3nn")
    return Prepared(model, info, splits, e0s, labelled_files, data_recipe)


def start_head(
    recipe: Recipe, foundation: torch.nn.Module, info: FoundationInfo, dtype: torch.dtype
) -> tuple[torch.nn.Module, FoundationInfo, Splits]:
    """The foundation's starting head (restricted to the data's elements unless
    ``foundation.elements: all``), the info that describes it, and the splits built for it.
    ``recipe`` is the one whose data files are read (after on-the-fly labelling)."""
    single = extract_head(foundation, info.head)
    selected = select_data(recipe, info, single)
    kept = data_elements(info, selected)
    if recipe.foundation.elements == "data" and kept != info.atomic_numbers:
        single = keep_elements(single, info, list(kept))
        log.info(
            "foundation.elements: data: kept %s of %d elements (%d parameters)",
            " ".join(chemical_symbols[z] for z in kept),
            len(info.atomic_numbers),
            sum(p.numel() for p in single.parameters()),
        )
        info = replace(info, atomic_numbers=kept)
    return single, info, load_splits(recipe, info, dtype, selected)


def assign_e0s(
    model: torch.nn.Module, foundation_single: torch.nn.Module, recipe: Recipe, train: Split, device: torch.device
) -> dict[str, dict[str, float]]:
    """Set each head's E0s as the recipe says; return them by fidelity and element.

    A fitted head with a ``base`` fidelity fitted before it starts from the base's E0s rather than
    the foundation's: where its own compositions cannot resolve every element (a few high-level
    energies, e.g. 8 geometries of 3 compositions for 4 elements), the unresolved directions keep
    the base level's E0s, which are a level of theory near it, instead of the foundation's, which
    can be hundreds of eV per atom away (measured: QZVP test energies off by 265 eV/atom).
    """
    zs = [int(z) for z in model.atomic_numbers]
    base = torch.atleast_2d(foundation_single.atomic_energies_fn.atomic_energies)[0].detach().cpu().double().numpy()
    train = statistics_sample(train, recipe, "the E0 fit")
    counts = train.counts(AtomicNumberTable(zs))
    labels, mask = train.energies(), train.energy_mask()
    foundation_energy: np.ndarray | None = None
    result: dict[str, dict[str, float]] = {}
    fitted: dict[str, np.ndarray] = {}
    for h, (name, spec) in enumerate(recipe.fidelities.items()):
        if spec.e0s == "fit" and mask[:, h].any():
            if foundation_energy is None:
                t = recipe.training
                foundation_energy = predict(
                    foundation_single.to(device),
                    train,
                    [0],
                    t.eval_batch_size,
                    device,
                    t.num_workers,
                    energies_only=True,
                ).energies[:, 0]
            sel = mask[:, h]
            prior = fitted.get(spec.base or "", base)
            residual = labels[sel, h] - foundation_energy[sel] - counts[sel] @ (prior - base)
            e0 = fit_e0s(counts[sel], residual, prior)
            fitted[name] = e0
        elif isinstance(spec.e0s, dict):
            e0 = base.copy()
            present = set(zs) & train.table.configs.elements
            for symbol, value in spec.e0s.items():
                z = symbol_to_z.get(symbol)
                if z is None or z not in zs:
                    raise RecipeError(f"fidelities.{name}.e0s: {symbol!r} is not an element of the foundation")
                e0[zs.index(z)] = value
                present.discard(z)
            if present:
                missing = ", ".join(chemical_symbols[z] for z in sorted(present))
                raise RecipeError(f"fidelities.{name}.e0s: no value for {missing}, which the data contains")
        else:
            e0 = base
        set_head_e0s(model, h, e0)
        result[name] = {chemical_symbols[z]: float(v) for z, v in zip(zs, e0, strict=True)}
    return result
