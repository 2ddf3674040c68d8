"""Replay against forgetting: the foundation's own level as one more fidelity, on geometries beyond
the fine-tuning data.

A fine-tuned foundation is used beyond its fine-tuning data, where nothing tells the shared backbone
to keep what the foundation knew. ``replay:`` adds a fidelity ``replay`` whose labels are the
foundation's own energies and forces (pseudo-labels: no reference calculation) on geometries chosen
from a pool, and whose head starts as the foundation's readout with the foundation's E0s. Every
element of the foundation is kept. A held-out share of the chosen geometries goes to the validation
data, where the replay head's errors against the foundation's labels measure how far the
foundation's level moved: with both replay weights 0 nothing is replayed, the head stays the
foundation's readout (no loss term reaches it), and the same figures measure what plain fine-tuning
forgets.

Everything is cached in the label cache, keyed by the foundation's content and the settings: the
generated pool (one per foundation, temperature and frames, whatever the run's seed: it costs 80
MD steps per molecule), the choice and held-out share (which follow the seed), and the labels. A
pool file is read through a store, and at most :data:`POOL_PER_CHOSEN` × ``budget`` of its
geometries (a seeded draw) are described for the choice, so time and memory grow with the budget,
not with the pool.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase import Atoms

from mace_mf.config.schema import REPLAY_FIDELITY as NAME
from mace_mf.config.schema import FidelitySpec, Recipe, ReplaySpec
from mace_mf.data.selection import select
from mace_mf.data.store import cache_root, open_configurations
from mace_mf.errors import RecipeError
from mace_mf.files import atomic_write_text, atomic_write_xyz, file_sha256
from mace_mf.labels.labelling import resolve_label_calculator

log = logging.getLogger(__name__)

POOL_PER_CHOSEN = 20
POOL_FIELDS = {"temperature", "frames"}  # what a generated pool depends on (with the foundation)
CHOICE_FIELDS = {"pool", "budget", "selection", "held_out", "temperature", "frames"}  # and the seed, the pool
MD_STEP_FS = 0.5
MD_WARMUP_STEPS = 20
MD_INTERVAL_STEPS = 10


def _key(recipe: Recipe, fields: set[str], *parts: object) -> str:
    """What a cached replay file is valid for: the foundation's content and the settings it depends on."""
    spec = recipe.replay
    assert spec is not None
    ident = {
        "foundation": file_sha256(Path(recipe.foundation.model)),
        "head": recipe.foundation.head,
        **spec.model_dump(include=fields),
        "parts": [str(p) for p in parts],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def small_molecules(elements: set[int]) -> list[Atoms]:
    """ASE's g2 molecules of at least two atoms made only of ``elements``, in g2's order."""
    from ase.build import molecule
    from ase.collections import g2

    found = []
    for name in g2.names:
        atoms = molecule(name)
        if len(atoms) >= 2 and set(atoms.numbers) <= elements:
            atoms.info["replay_molecule"] = name
            found.append(atoms)
    return found


def generated_pool(recipe: Recipe, elements: set[int], spec: ReplaySpec, path: Path) -> list[Atoms]:
    """MD frames of :func:`small_molecules`, run with the foundation file at ``spec.temperature``
    (Langevin, 0.5 fs, ``spec.frames`` frames 10 steps apart after 20 steps), cached in ``path``."""
    if path.is_file():
        return ase.io.read(path, ":", format="extxyz")
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from mace.calculators import MACECalculator
    from rich.console import Console
    from rich.progress import track

    molecules = small_molecules(elements)
    if not molecules:
        raise RecipeError("replay.pool: the foundation's elements make no molecule of ASE's g2 set; give a pool file")
    head = {"head": recipe.foundation.head} if recipe.foundation.head else {}
    calc = MACECalculator(model_paths=recipe.foundation.model, device="cpu", default_dtype="float32", **head)
    rng = np.random.default_rng(4409)  # one pool per foundation and settings, whatever the run's seed
    frames = []
    bar = track(molecules, "replay: MD of g2 molecules", console=Console(stderr=True), transient=True)
    for atoms in bar:
        atoms.calc = calc
        MaxwellBoltzmannDistribution(atoms, temperature_K=spec.temperature, rng=rng)
        dynamics = Langevin(  # fixcm=False: a frame's centre of mass is irrelevant to its labels
            atoms, MD_STEP_FS * units.fs, temperature_K=spec.temperature, friction=0.02, rng=rng, fixcm=False
        )
        dynamics.run(MD_WARMUP_STEPS)
        for _ in range(spec.frames):
            dynamics.run(MD_INTERVAL_STEPS)
            frame = Atoms(atoms.numbers, atoms.positions.copy(), info=dict(atoms.info))
            frames.append(frame)
    atomic_write_xyz(path, frames)
    log.info(
        "replay: generated %d MD frames of %d g2 molecules at %.0f K", len(frames), len(molecules), spec.temperature
    )
    return ase.io.read(path, ":", format="extxyz")  # as every later run reads it, digit for digit


def pool_sample(recipe: Recipe, spec: ReplaySpec, count: int) -> tuple[list[Atoms], str]:
    """At most ``count`` geometries of the pool files (all of them when fewer; else a seeded draw),
    without their labels, and what identifies the pool's content (its stores' names)."""
    assert spec.pool is not None
    configs = open_configurations(spec.pool, recipe.data.format, cache_root(recipe.data.store_cache))
    rows = np.arange(len(configs))
    if len(rows) > count:
        rows = np.sort(np.random.default_rng([recipe.seed, 7717]).choice(len(rows), size=count, replace=False))
    frames = [configs.atoms(int(r)) for r in rows]
    identity = ",".join(store.path.name for store in configs.stores)
    return [Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc) for a in frames], identity


def foundation_labels(recipe: Recipe, frames: list[Atoms]) -> list[Atoms]:
    """``frames`` with the foundation's own energies and forces (float64, stock ``MACECalculator``:
    what ``labels: {calculator: foundation}`` computes), in this process: a few hundred geometries
    take seconds, where a labelling worker would first spend them importing torch."""
    from mace.calculators import MACECalculator

    head = {"head": recipe.foundation.head} if recipe.foundation.head else {}
    calc = MACECalculator(model_paths=recipe.foundation.model, device="cpu", default_dtype="float64", **head)
    labelled = []
    for atoms in frames:
        copy = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc, info=dict(atoms.info))
        calc.calculate(copy, ["energy", "forces"])
        copy.info[f"{NAME}_energy"] = float(calc.results["energy"])
        copy.arrays[f"{NAME}_forces"] = np.array(calc.results["forces"])
        labelled.append(copy)
    return labelled


def _listed(paths: str | list[str]) -> list[str]:
    return [paths] if isinstance(paths, str) else list(paths)


def replay_recipe(recipe: Recipe, model: torch.nn.Module, elements: set[int], cache_dir: Path) -> Recipe:
    """``recipe`` with the replay fidelity and its chosen, labelled geometries in the training and
    validation data (``model``: the foundation's starting head, whose descriptors choose them)."""
    spec = recipe.replay
    if spec is None or not spec.enabled:
        return recipe
    if NAME in recipe.fidelities:
        raise RecipeError(f"replay: a fidelity is already named {NAME!r}; rename it to use replay")
    resolve_label_calculator(recipe, "foundation")  # a local foundation file, or the error that says why not
    cache_dir.mkdir(parents=True, exist_ok=True)
    if spec.pool is None:
        path = cache_dir / f"replay-pool-{_key(recipe, POOL_FIELDS)}.xyz"
        pool, identity = generated_pool(recipe, elements, spec, path), path.name
    else:
        pool, identity = pool_sample(recipe, spec, POOL_PER_CHOSEN * spec.budget)
    key = _key(recipe, CHOICE_FIELDS, recipe.seed, identity)
    choice = cache_dir / f"replay-choice-{key}.json"
    count = min(spec.budget, len(pool))
    held = max(1, round(spec.held_out * count))
    if choice.is_file():
        parts = json.loads(choice.read_text())
    else:
        chosen = select(pool, count, spec.selection, recipe.seed, model)
        order = np.random.default_rng([recipe.seed, 3371]).permutation(chosen)
        parts = {"valid": sorted(int(i) for i in order[:held]), "train": sorted(int(i) for i in order[held:])}
        atomic_write_text(choice, json.dumps(parts))
    labelled = {}
    for split, indices in parts.items():
        path = cache_dir / f"replay-{split}-{key}.xyz"
        if not path.is_file():
            atomic_write_xyz(path, foundation_labels(recipe, [pool[i] for i in indices]))
        labelled[split] = str(path)
    log.info(
        "replay: %d of %d pool geometries chosen by %s, %d held out to measure forgetting; weights E %g, F %g",
        count,
        len(pool),
        spec.selection,
        held,
        spec.energy_weight,
        spec.forces_weight,
    )
    fidelity = FidelitySpec(
        energy_key=f"{NAME}_energy",
        forces_key=f"{NAME}_forces",
        energy_weight=spec.energy_weight,
        forces_weight=spec.forces_weight,
        e0s="foundation",
        base=None,
        coupling="independent",
        coupling_strength=0.0,
    )
    data = recipe.data
    train = [*_listed(data.train), labelled["train"]]  # with weights 0 not trained on (splits.weighed_rows)
    valid = [*_listed(data.valid), labelled["valid"]] if data.valid is not None else None
    if valid is None:  # validation is split off the training files: the held-out geometries join them
        train.append(labelled["valid"])
    return recipe.model_copy(
        update={
            "fidelities": {**recipe.fidelities, NAME: fidelity},
            "data": data.model_copy(update={"train": train, "valid": valid}),
            "foundation": recipe.foundation.model_copy(update={"elements": "all"}),
        }
    )
