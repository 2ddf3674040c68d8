"""Force validation from energies alone: displacement pairs, made and read (scored in
:mod:`mace_mf.evaluation.pairs`).

A user with CCSD(T) energies has no CCSD(T) forces to validate against, yet whether the low level's
forces help the high head is exactly what decides between recipes. Two energies measure one force
component: for a geometry ``x`` and a unit vector ``u`` in the 3N-dimensional space of its
coordinates, ``-(E(x + δu) - E(x - δu)) / 2δ = F(x)·u + O(δ²)``. ``mace-mf displace`` writes the
pairs ``x ± δu`` for chosen validation geometries (``u`` seeded, uniform on the sphere); the user
labels them with the high level (energies only, ``mace-mf label --energies-only``); evaluation scores
every model's ``F(x)·u`` against that finite difference.

Why it estimates the force RMSE: for ``u`` uniform on the unit sphere of R^3N, ``E[(ΔF·u)²] =
|ΔF|²/3N``, the mean squared force-component error of that geometry. Weighting each pair by its
3N components makes ``sqrt(Σ 3N (ΔF·u)² / Σ 3N)`` an estimate of the pooled component RMSE that
``f_rmse_meV_A`` reports, from two energies per direction instead of 3N force components. Its
spread falls as one over the square root of the number of pairs, so the per-pair errors are kept
(``pair_errors.json``) and a decision between models is resolved by a paired bootstrap over the pairs
(:func:`paired_preference`), not by the means alone.

Truncation: with ``δ = 0.01 Å`` (the default, the norm of the whole displacement, so each atom
moves about ``0.01/sqrt(N)`` Å) the ``O(δ²)`` term is ``δ²/6`` times a third directional derivative.
Measured with the demo foundation on 40 pairs of the demo's hot validation molecules: 1.4 meV/Å RMS
(4.8 at most), 5.7 at 0.02 Å and 0.35 at 0.005 Å; it adds in quadrature to a model's error of 100 or
more. An SCF converged to 1e-10 Hartree adds 1e-4 meV/Å. The centre and the displacement are
recomputed from the two labelled geometries, so the rounding of positions in the file does not bias
the estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from mace_mf.config.schema import FidelitySpec
from mace_mf.data.read import Labels, read_atoms, read_labels
from mace_mf.data.store import check_geometry
from mace_mf.errors import DataError, RunError
from mace_mf.files import atomic_write_xyz

PAIR_ID = "pair_id"
PAIR_SIGN = "pair_sign"
PAIR_DELTA = "pair_delta"
PAIR_SOURCE = "pair_source"
PAIR_DIRECTION = "pair_direction"
KEEP_INFO = ("charge", "multiplicity", "spin", "uhf", "config_id", "molecule")


def make_pairs(frames: Sequence[Atoms], n: int, delta: float, seed: int) -> list[Atoms]:
    """``2n`` configurations ``x ± δu`` for ``n`` seeded directions on seeded geometries of ``frames``.

    Geometries are taken without replacement (a seeded permutation) and reused only when ``n``
    exceeds their number. Each configuration keeps the geometry's charge/spin/identity keys (what a
    calculator needs), none of its labels, and records ``pair_id``, ``pair_sign`` (+1/-1),
    ``pair_delta`` (Å), ``pair_source`` (index in ``frames``) and the unit direction
    ``pair_direction`` (``[n_atoms, 3]``, the same on both configurations).
    """
    if n < 1:
        raise DataError(f"--n {n}: give at least one pair")
    if not 0.0 < delta <= 0.1:
        raise DataError(f"--delta {delta}: give a displacement norm in (0, 0.1] Å; 0.01 is a good default")
    if not frames:
        raise DataError("no geometries to displace")
    order = np.random.default_rng([seed, 4051]).permutation(len(frames))
    pairs: list[Atoms] = []
    for pair in range(n):
        source = int(order[pair % len(frames)])
        base = frames[source]
        rng = np.random.default_rng([seed, 4051, pair])
        direction = rng.normal(size=(len(base), 3))
        direction /= np.linalg.norm(direction)
        for sign in (1, -1):
            atoms = Atoms(base.numbers, base.positions + sign * delta * direction, cell=base.cell, pbc=base.pbc)
            atoms.info.update({k: base.info[k] for k in KEEP_INFO if k in base.info})
            atoms.info.update({PAIR_ID: pair, PAIR_SIGN: sign, PAIR_DELTA: delta, PAIR_SOURCE: source})
            atoms.arrays[PAIR_DIRECTION] = direction.copy()
            pairs.append(atoms)
    return pairs


@dataclass
class Pairs:
    """Labelled displacement pairs: the centre geometries, unit directions and, per fidelity, the
    finite-difference directional force ``-(E+ - E-)/2|d|`` (eV/Å; NaN where a fidelity lacks an
    energy on either side)."""

    source: str
    ids: list[int]
    geometries: int  # distinct source geometries the pairs were made from
    centres: list[Atoms]
    directions: list[np.ndarray]
    reference: np.ndarray  # [n_pairs, H]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def weights(self) -> np.ndarray:
        """Force components per pair (3N): the weight that makes the estimate a pooled RMSE."""
        return np.array([3 * len(a) for a in self.centres], dtype=float)


def read_pairs(paths: str | list[str], specs: dict[str, FidelitySpec], fmt: str | None) -> Pairs:
    """Labelled pairs from ``mace-mf displace`` output (then ``mace-mf label``), checked pair by pair."""
    files = [paths] if isinstance(paths, str) else list(paths)
    halves: dict[tuple[str, int], dict[int, tuple[Atoms, Labels]]] = {}
    for path in files:
        for i, atoms in enumerate(read_atoms(path, fmt)):
            where = f"{path}: configuration {i}"
            if PAIR_ID not in atoms.info or PAIR_SIGN not in atoms.info or PAIR_DIRECTION not in atoms.arrays:
                raise DataError(
                    f"{where}: not a displacement pair (no {PAIR_ID}/{PAIR_SIGN}); make pairs with mace-mf displace"
                )
            check_geometry(atoms, where)
            key = (path, int(atoms.info[PAIR_ID]))
            sign = int(atoms.info[PAIR_SIGN])
            if sign in halves.setdefault(key, {}):
                raise DataError(f"{where}: pair {key[1]} has two {sign:+d} halves; give each pair once")
            halves[key][sign] = (atoms, read_labels(atoms, specs, where))
    ids, centres, directions, reference, sources = [], [], [], [], set()
    for (path, pair), sides in halves.items():
        if set(sides) != {1, -1}:
            raise DataError(f"{path}: pair {pair} has only its {next(iter(sides)):+d} half; keep both halves")
        (plus, lp), (minus, lm) = sides[1], sides[-1]
        if len(plus) != len(minus) or not np.array_equal(plus.numbers, minus.numbers):
            raise DataError(f"{path}: pair {pair}: its halves are different molecules; regenerate the pairs")
        half = 0.5 * (plus.positions - minus.positions)
        norm = float(np.linalg.norm(half))
        if not 0.0 < norm <= 0.2:
            raise DataError(f"{path}: pair {pair}: halves {2 * norm:.3g} Å apart; regenerate with mace-mf displace")
        centre = plus.copy()
        centre.positions = 0.5 * (plus.positions + minus.positions)
        centre.arrays.pop(PAIR_DIRECTION, None)
        row = [
            np.nan if a is None or b is None else -(a - b) / (2.0 * norm)
            for a, b in zip(lp.energy, lm.energy, strict=True)
        ]
        ids.append(pair)
        sources.add((path, plus.info.get(PAIR_SOURCE, pair)))
        centres.append(centre)
        directions.append(half / norm)
        reference.append(row)
    table = np.array(reference, dtype=float).reshape(len(ids), -1)
    return Pairs(", ".join(files), ids, len(sources), centres, directions, table)


def displace_file(
    input_file: Path, output: Path, n: int, delta: float, seed: int, overwrite: bool, fmt: str | None
) -> int:
    """``mace-mf displace``: ``n`` pairs of the geometries of ``input_file`` into ``output``; the number
    of distinct geometries they displace."""
    if output.exists() and not overwrite:
        raise RunError(f"{output}: already exists; pass --overwrite to replace it, or choose another OUTPUT")
    frames = read_atoms(str(input_file), fmt)
    for i, atoms in enumerate(frames):
        check_geometry(atoms, f"{input_file}: configuration {i}")
    pairs = make_pairs(frames, n, delta, seed)
    atomic_write_xyz(output, pairs)
    return len({a.info[PAIR_SOURCE] for a in pairs})
