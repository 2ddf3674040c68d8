"""Score exported models' forces against reference labels, alone and blended (docs/benchmarks.md).

    python scripts/blend_forces.py ../shared/data/pyseqm_chno/test.xyz --reference dft_forces \\
        --label pm6_forces --model eo=runs/full3/sf-high-e/seed0/models/dft.model \\
        --model mf=runs/full3/mf/seed0/models/dft.model

Prints each source's force RMSE against ``--reference`` (meV/Å), the blends w·A + (1 − w)·B of every
pair at w = 0.3, 0.5, 0.7, and the correlation of the pair's errors: how far two sources' errors are
independent, i.e. how much a high head could gain by combining them. Models run in stock
``MACECalculator`` (float64, one thread); ``--label`` adds force labels already in the file as a source.
"""

from __future__ import annotations

import argparse
import itertools

import mace  # noqa: F401  (before e3nn)
import numpy as np
import torch
from ase.io import read
from mace.calculators import MACECalculator


def model_forces(path: str, frames: list) -> np.ndarray:
    calc = MACECalculator(model_paths=path, device="cpu", default_dtype="float64")
    out = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        out.append(atoms.get_forces())
    return np.concatenate(out)


def rmse(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)) * 1000.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="extxyz file with the reference (and any label) forces")
    parser.add_argument("--reference", required=True, help="per-atom array of reference forces, e.g. dft_forces")
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH of an exported model (repeatable)")
    parser.add_argument("--label", action="append", default=[], help="per-atom force array to score as a source")
    args = parser.parse_args()
    torch.set_num_threads(1)
    frames = read(args.data, ":")
    reference = np.concatenate([a.arrays[args.reference] for a in frames])
    sources = {name: np.concatenate([a.arrays[name] for a in frames]) for name in args.label}
    for spec in args.model:
        name, _, path = spec.partition("=")
        sources[name] = model_forces(path, frames)
    print(f"| forces scored against {args.reference} | F RMSE (meV/Å) |\n|---|---|")
    for name, forces in sources.items():
        print(f"| {name} | {rmse(forces - reference):.0f} |")
    for (a, fa), (b, fb) in itertools.combinations(sources.items(), 2):
        for w in (0.3, 0.5, 0.7):
            print(f"| {w} × {a} + {1 - w:.1f} × {b} | {rmse(w * fa + (1 - w) * fb - reference):.0f} |")
    for (a, fa), (b, fb) in itertools.combinations(sources.items(), 2):
        corr = np.corrcoef((fa - reference).ravel(), (fb - reference).ravel())[0, 1]
        print(f"error correlation {a} vs {b}: {corr:.2f}")


if __name__ == "__main__":
    main()
