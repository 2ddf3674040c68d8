"""Build the ethanol multi-fidelity benchmark files from ../shared/data/botnet_ethanol (not committed).

The paper's setting on real data: PBE/def2-SVP energies kept on only ``--n-pbe`` (100) of the 1000
training geometries, cheap GFN2-xTB energies and forces on all of them, and the PBE forces of an
independent MD trajectory (``test_MD.xyz``) to score the PBE head's forces, which it never trained on.

The xTB labels are not written here: ``recipes/ethanol_mf.yaml`` declares
``xtb: {labels: {calculator: gfn2-xtb}}``, so training labels these files on the fly with the engine
of ``mace-mf label`` and caches them (``runs/label-cache/``). Files written to ``--out``:

* ``train.xyz``: 1000 − ``--n-valid`` geometries; ``pbe_energy`` / ``pbe_forces`` only on a seeded
  ``--n-pbe`` of them (the forces are scored, and trained on only by the E+F baseline arm);
* ``train_pbe100.xyz``: only those ``--n-pbe`` geometries (the baseline arms' training file);
* ``valid.xyz``: ``--n-valid`` other geometries with PBE energies and forces (checkpoint selection);
* ``test.xyz``: all of ``test_MD.xyz`` with ``pbe_energy`` / ``pbe_forces``.

The source files hold PBE labels as calculator results (extxyz ``energy``/``forces``); they are
renamed to ``pbe_*`` so that no reader confuses them with another level of theory.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms

ROOT = Path(__file__).resolve().parents[1]


def with_pbe_keys(atoms: Atoms, keep: bool) -> Atoms:
    """The geometry with its PBE labels under ``pbe_*`` keys (or none), no calculator attached."""
    bare = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc, info=dict(atoms.info))
    if keep:
        bare.info["pbe_energy"] = float(atoms.get_potential_energy())
        bare.arrays["pbe_forces"] = np.array(atoms.get_forces())
    return bare


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "botnet_ethanol")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ethanol_mf_data")
    parser.add_argument("--n-pbe", type=int, default=100, help="training geometries that keep PBE labels")
    parser.add_argument("--n-valid", type=int, default=50, help="validation geometries (PBE energies+forces)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and split")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    train_file, test_file = args.source / "train.xyz", args.source / "test_MD.xyz"
    if not train_file.is_file() or not test_file.is_file():
        raise SystemExit(f"{args.source}: train.xyz / test_MD.xyz not found; pass --source")
    frames = ase.io.read(train_file, ":")
    order = np.random.default_rng(args.seed).permutation(len(frames))
    valid = sorted(order[: args.n_valid].tolist())
    pbe = set(order[args.n_valid : args.n_valid + args.n_pbe].tolist())
    train = [i for i in range(len(frames)) if i not in set(valid)]
    for atoms, i in zip(frames, range(len(frames)), strict=True):
        atoms.info["source_index"] = i
    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        "train.xyz": [with_pbe_keys(frames[i], i in pbe) for i in train],
        "train_pbe100.xyz": [with_pbe_keys(frames[i], True) for i in sorted(pbe)],
        "valid.xyz": [with_pbe_keys(frames[i], True) for i in valid],
        "test.xyz": [with_pbe_keys(atoms, True) for atoms in ase.io.read(test_file, ":")],
    }
    for name, configs in files.items():
        ase.io.write(args.out / name, configs, format="extxyz")
    summary = {name: len(configs) for name, configs in files.items()}
    summary["train_with_pbe"] = sum("pbe_energy" in a.info for a in files["train.xyz"])
    (args.out / "summary.json").write_text(json.dumps({**summary, "seed": args.seed}, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
