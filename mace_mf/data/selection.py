"""Which geometries get the expensive labels: selection from a pool that carries low-level labels.

The user's scarce resource is high-level calculations, and the pool to choose from (geometries with
cheap low-level labels) is large. Four rules, each a ``--method`` of ``mace-mf select`` and a value
of ``fidelities.<name>.label_selection`` (which geometries keep a ``label_fraction`` of that
fidelity's labels in a benchmark):

- ``fps``: farthest-point sampling in a MACE model's descriptor space: each geometry is the mean over
  its atoms of the invariant node features of every interaction layer (standardised over the pool),
  and each pick is the geometry farthest from all picked so far, so the budget covers the pool's
  chemistry and geometry evenly instead of its densest region (what mace-torch does to pick replay
  data, applied here to the high-level budget);
- ``kmeans``: k-means in the same (standardised) descriptor space with as many clusters as the
  budget, and from each cluster the geometry nearest its centre: the budget follows the pool's
  density, as a random draw does in expectation, but one geometry per cluster instead of a draw's
  clumps and gaps (stratified sampling), where ``fps`` spends it on the pool's extremes;
- ``disagreement``: the geometries on which the model and the low level disagree most (force RMSE
  of the model against the low-level forces), where a model leaning on either is least sure;
- ``random``: a seeded uniform draw, the baseline.

Measured effect: ``docs/benchmarks.md`` ("Choosing the geometries"). ``kmeans`` is the default of
``mace-mf select``: on both data sets measured it gains as much high-level energy accuracy over a
random subset as ``fps`` (10-37 %) at a smaller cost in forces (at most 1.3 %, against 4 %). In a
recipe the model is the foundation (all that exists before training); ``mace-mf select --model`` takes any
MACE file, e.g. the low head of a first, low-level-only fine-tuning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mace  # noqa: F401  (before e3nn: mace relaxes torch.load for e3nn's constants)
import numpy as np
import torch
from ase import Atoms
from e3nn import o3
from mace.tools.torch_geometric import DataLoader
from scipy.cluster.vq import kmeans2, vq

from mace_mf.data.graphs import batch_dict, graphs_for_model
from mace_mf.data.read import read_atoms
from mace_mf.data.store import check_geometry
from mace_mf.errors import DataError, RunError
from mace_mf.files import atomic_write_xyz
from mace_mf.model.build import resolve_device
from mace_mf.model.forward import fidelity_energies, fidelity_forces, node_features
from mace_mf.model.foundation import load_model_file
from mace_mf.model.heads import head_names

METHODS = ("fps", "kmeans", "disagreement", "random")
KMEANS_STARTS = 5  # k-means finds a local optimum; the lowest within-cluster spread of these is kept


def budget_count(budget: float, pool: int) -> int:
    """A budget as a number of geometries: a fraction of the pool below 1, a count from 1."""
    count = round(budget * pool) if budget < 1 else int(budget)
    if budget <= 0 or count < 1:
        raise DataError(f"--budget {budget:g}: give a fraction of the pool in (0, 1) or a count of at least 1")
    if count > pool:
        raise DataError(
            f"--budget {budget:g}: the pool holds only {pool} geometries; give a fraction of the pool or fewer"
        )
    return count


def _scalar_slices(model: torch.nn.Module) -> list[slice]:
    """Per interaction layer, where the invariant (0e) channels sit in its node features."""
    slices = []
    for product in model.products:
        irreps = o3.Irreps(str(product.linear.irreps_out))
        scalar = [s for (mul, ir), s in zip(irreps, irreps.slices(), strict=True) if ir.l == 0 and ir.p == 1]
        slices.append(slice(scalar[0].start, scalar[-1].stop) if scalar else slice(0, 0))
    return slices


def descriptors(model: torch.nn.Module, frames: Sequence[Atoms], batch_size: int = 32) -> np.ndarray:
    """``[n, D]``: per geometry, the mean over atoms of every layer's invariant node features."""
    device = next(model.parameters()).device
    slices = _scalar_slices(model)
    graphs = graphs_for_model(frames, model, 1)
    rows: list[np.ndarray] = []
    model.eval()
    with torch.no_grad():
        for batch in DataLoader(graphs, batch_size=batch_size, shuffle=False, drop_last=False):
            data = batch_dict(batch.to(device))
            layers, _ = node_features(model, data)
            feats = torch.cat([layer[:, s] for layer, s in zip(layers, slices, strict=True)], dim=1)
            ptr = data["ptr"].cpu().tolist()
            for g in range(len(ptr) - 1):
                rows.append(feats[ptr[g] : ptr[g + 1]].mean(0).double().cpu().numpy())
    return np.stack(rows)


def standardised(points: np.ndarray) -> np.ndarray:
    """Every descriptor dimension at zero mean and unit spread over the pool (constant ones left
    at zero), so that no layer's feature scale decides the distances."""
    std = points.std(0)
    return (points - points.mean(0)) / np.where(std > 0, std, 1.0)


def farthest_points(points: np.ndarray, count: int, seed: int) -> list[int]:
    """Greedy farthest-point sampling (Euclidean, after standardising every dimension); the first
    pick is seeded, each next one maximises the distance to the nearest pick."""
    x = standardised(points)
    first = int(np.random.default_rng([seed, 6271]).integers(len(x)))
    chosen = [first]
    nearest = np.linalg.norm(x - x[first], axis=1)
    nearest[first] = -1.0  # never picked twice, even among identical descriptors
    for _ in range(count - 1):
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(x - x[pick], axis=1))
        nearest[chosen] = -1.0
    return chosen


def plus_plus_start(x: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ starting centres: each next one drawn with probability ∝ squared distance to the
    nearest so far. scipy's ``minit="++"`` recomputes every distance at each draw (19 s for 467
    centres in pyseqm's pool, at load 5); keeping the nearest distance makes it 0.7 s."""
    picks = [int(rng.integers(len(x)))]
    nearest = ((x - x[picks[0]]) ** 2).sum(1)
    for _ in range(count - 1):
        total = nearest.sum()  # 0 once every distinct point is a centre: then any point will do
        picks.append(int(rng.choice(len(x), p=nearest / total if total > 0 else None)))
        nearest = np.minimum(nearest, ((x - x[picks[-1]]) ** 2).sum(1))
    return x[picks]


def cluster_centres(points: np.ndarray, count: int, seed: int) -> list[int]:
    """A ranking of every point: first, per k-means cluster (``count`` clusters, the best of
    ``KMEANS_STARTS`` seeded k-means++ starts, after standardising every dimension), the member
    nearest the cluster's centre, larger clusters first; then the rest, farthest from those first
    (the replacements :func:`cover_compositions` may need)."""
    x = standardised(points)
    rng = np.random.default_rng([seed, 6271])
    starts = [kmeans2(x, plus_plus_start(x, count, rng), minit="matrix", iter=20) for _ in range(KMEANS_STARTS)]
    centres, label = min(starts, key=lambda s: float(((x - s[0][s[1]]) ** 2).sum()))
    sizes = np.bincount(label, minlength=count)
    medoids = []
    for c in sorted(np.flatnonzero(sizes), key=lambda c: -sizes[c]):
        members = np.flatnonzero(label == c)
        medoids.append(int(members[np.argmin(np.linalg.norm(x[members] - centres[c], axis=1))]))
    rest = np.setdiff1d(np.arange(len(x)), medoids)
    _, nearest = vq(x[rest], x[medoids])
    return medoids + [int(i) for i in rest[np.argsort(-nearest, kind="stable")]]


def disagreement(
    model: torch.nn.Module, frames: Sequence[Atoms], forces: Sequence[np.ndarray], head: int = 0, batch_size: int = 32
) -> np.ndarray:
    """Per geometry, the force RMSE (eV/Å) of the model's ``head`` against the low-level forces."""
    device = next(model.parameters()).device
    graphs = graphs_for_model(frames, model, 1)
    scores: list[float] = []
    model.eval()
    start = 0
    for batch in DataLoader(graphs, batch_size=batch_size, shuffle=False, drop_last=False):
        data = batch_dict(batch.to(device))
        (predicted,) = fidelity_forces(fidelity_energies(model, data, [head]), data["positions"], [0], False)
        ptr = data["ptr"].cpu().tolist()
        for g in range(len(ptr) - 1):
            diff = predicted[ptr[g] : ptr[g + 1]].detach().double().cpu().numpy() - forces[start + g]
            scores.append(float(np.sqrt((diff**2).mean())))
        start += len(ptr) - 1
    return np.array(scores)


def select(
    frames: Sequence[Atoms],
    count: int,
    method: str,
    seed: int,
    model: torch.nn.Module | None = None,
    low_forces: Sequence[np.ndarray | None] | None = None,
    head: int = 0,
) -> list[int]:
    """Indices of ``count`` geometries of ``frames`` chosen by ``method``, in the order picked, whose
    compositions resolve every element's reference energy (:func:`cover_compositions`)."""
    if method not in METHODS:
        raise DataError(f"selection method {method!r}: use one of {', '.join(METHODS)}")
    if method == "random":
        order = [int(i) for i in np.random.default_rng([seed, 6271]).permutation(len(frames))]
    elif model is None:
        raise DataError(f"selection method {method!r} needs a MACE model (--model)")
    elif method == "fps":
        order = farthest_points(descriptors(model, frames), len(frames), seed)
    elif method == "kmeans":
        order = cluster_centres(descriptors(model, frames), count, seed)
    else:
        if low_forces is None or any(f is None for f in low_forces):
            raise DataError(
                "selection method 'disagreement' needs low-level forces on every pool geometry (--forces-key)"
            )
        scores = disagreement(model, frames, [np.asarray(f) for f in low_forces], head)  # type: ignore[arg-type]
        order = [int(i) for i in np.argsort(-scores, kind="stable")]
    counts = np.array([np.bincount(a.numbers, minlength=119) for a in frames], dtype=float)
    return cover_compositions(counts, order, count)


def cover_compositions(counts: np.ndarray, order: Sequence[int], count: int) -> list[int]:
    """The first ``count`` of ``order`` (a method's ranking of the whole pool), amended so that the
    chosen geometries' element counts span as many directions as the pool's: otherwise the
    high-level atomic reference energies cannot all be fitted from them. Measured in the seed
    regime: the disagreement rule alone chose 8 geometries of H2O2 and N2O, none with carbon; with
    one HCO added, 3 compositions for 4 elements still left one direction unfitted.

    While the span is short, the best-ranked geometry that widens it replaces the worst-ranked pick
    whose removal keeps the span.
    """
    target = int(np.linalg.matrix_rank(counts))
    if count < target:
        raise DataError(f"--budget {count}: fewer geometries than the pool's {target} independent compositions")
    picks = list(order[:count])
    rest = list(order[count:])
    while (rank := int(np.linalg.matrix_rank(counts[picks]))) < target:
        candidate = next(i for i in rest if np.linalg.matrix_rank(counts[[*picks, i]]) > rank)
        drop = next(
            k
            for k in reversed(range(len(picks)))
            if np.linalg.matrix_rank(counts[[*picks[:k], *picks[k + 1 :], candidate]]) > rank
        )
        picks[drop] = candidate
        rest.remove(candidate)
    return picks


@dataclass(frozen=True)
class Selection:
    """What ``mace-mf select`` chose: ``count`` of ``pool`` geometries, in ``seconds``."""

    count: int
    pool: int
    seconds: float


def select_file(
    pool: Path,
    output: Path,
    budget: float,
    model_or_run: Path | None,
    method: str,
    head: str | None,
    forces_key: str | None,
    seed: int,
    rest: Path | None,
    overwrite: bool,
    fmt: str | None,
    device: str = "cpu",
) -> Selection:
    """``mace-mf select``: choose from the geometries of ``pool`` and write them (each tagged with
    ``pool_index``, ``selection_rank`` and ``selection``) to ``output``; the others to ``rest``."""
    if method not in METHODS:
        raise DataError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    for path in (output, rest):
        if path is not None and path.exists() and not overwrite:
            raise RunError(f"{path}: already exists; pass --overwrite to replace it, or choose another name")
    started = time.perf_counter()
    frames = read_atoms(str(pool), fmt)
    for i, atoms in enumerate(frames):
        check_geometry(atoms, f"{pool}: configuration {i}")
    count = budget_count(budget, len(frames))
    where = resolve_device(device)
    dtype = torch.float64 if where.type == "cpu" else torch.float32
    loaded = load_model_file(model_or_run, dtype)[0].to(where) if model_or_run is not None else None
    index = 0
    if loaded is not None and head is not None:
        names = head_names(loaded)
        if head not in names:
            raise DataError(f"--head {head!r}: not a head of {model_or_run} (heads: {names})")
        index = names.index(head)
    forces = None
    if method == "disagreement":
        if forces_key is None:
            raise DataError("--method disagreement: give --forces-key, the pool's low-level forces (atoms.arrays)")
        missing = [i for i, a in enumerate(frames) if forces_key not in a.arrays]
        if missing:
            raise DataError(f"{pool}: configuration {missing[0]} has no {forces_key!r}; label the pool first")
        forces = [a.arrays[forces_key] for a in frames]
    chosen = select(frames, count, method, seed, loaded, forces, index)
    rank = {i: r for r, i in enumerate(chosen)}
    picked = []
    for i in sorted(chosen):
        atoms = frames[i].copy()
        atoms.info.update(pool_index=i, selection_rank=rank[i], selection=method)
        picked.append(atoms)
    atomic_write_xyz(output, picked)
    if rest is not None:
        atomic_write_xyz(rest, [frames[i] for i in range(len(frames)) if i not in rank])
    return Selection(count, len(frames), time.perf_counter() - started)
