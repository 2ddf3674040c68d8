"""Build the DFT -> correlated-wavefunction data set: B3LYP forces in bulk, MP2 energies, MP2 forces to score.

The case the seed paper is about, on data of the project's own: a cheap DFT level with energies and
forces on every geometry, a correlated wavefunction level with energies only, and the correlated
level's forces on the test geometries alone, where they score the high head's forces (never
trained on). Made from scratch with PySCF and the labelling engine of ``mace-mf label``:

* geometries: 12 closed-shell C/H/N/O molecules of ASE's g2 collection with 5-9 atoms (alcohols,
  ethers, an epoxide, carbonyls, acids, an ester, an amide, amines, a nitrile, a nitro compound),
  sampled by GFN2-xTB Langevin MD at 600-1000 K, randomly rotated and rattled; frames with atoms
  closer than 0.7 Å or a changed bond graph are rejected (the sampling of ``scripts/make_demo_data.py``,
  its own random stream); the GFN2-xTB energies and forces come with the sampling (``xtb_*``);
* ``dft_energy`` / ``dft_forces``: B3LYP/6-31G* (density-fitted RKS, grid level 2, SCF to 1e-10 Ha),
  on every geometry;
* ``mp2_energy``: MP2/cc-pVDZ (conventional RHF reference, 1s cores frozen), on every geometry;
  ``mp2_forces``: its analytic gradient, on the test split only;
* a seeded split into train/valid/test (``--n-valid`` 40, ``--n-test`` 100, the rest training),
  then the label gaps between the levels written to ``gaps.json``;
* ``valid_pairs.xyz``: ``--pairs`` (100) ± 0.01 Å displacement pairs of the validation geometries
  (``mace-mf displace``) with MP2 energies: what lets ``mace-mf bench`` judge forces with no MP2 force
  anywhere (``data.valid_pairs``).

Resumable as ``scripts/make_seed_regime_data.py``: the geometries are sampled once, and every
labelling step keeps its results in ``<file>.partial.jsonl`` as they arrive, so running the script
again after a kill continues where it stopped. ``--workers 1`` takes about an hour on this project's
2-core machine.

    python scripts/make_correlated_data.py --out demo/correlated
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_seed_regime_data import data_set_parser, gaps, sample, sampling_options, split

from mace_mf.data.pairs import displace_file
from mace_mf.files import atomic_write_text
from mace_mf.labels.calculators import parse_calculator_spec
from mace_mf.labels.labelling import label_file

LOG = logging.getLogger("make_correlated_data")

MOLECULES: tuple[str, ...] = (
    "CH3OH", "CH3CH2OH", "CH3OCH3", "CH2OCH2", "CH3CHO", "HCOOH", "CH3COOH", "HCOOCH3", "CH3CONH2",
    "H3CNH2", "CH3CN", "CH3NO2",
)  # fmt: skip
SAMPLING_STREAM = 11  # an independent stream of make_demo_data's seed scheme (demo 0, 1; seed regime 7)
SPLITS = ("test", "valid", "train")  # the scoring split first
# (file suffix, calculator, options, energy key, forces key, splits): applied in this order.
STEPS: tuple[tuple[str, str, dict, str | None, str | None, tuple[str, ...]], ...] = (
    ("dft", "pyscf:b3lyp/6-31g*", {"grid_level": 2}, "dft_energy", "dft_forces", SPLITS),
    ("mp2", "pyscf:mp2/cc-pvdz", {}, "mp2_energy", None, SPLITS),
    ("mp2f", "pyscf:mp2/cc-pvdz", {}, None, "mp2_forces", ("test",)),
)


def label_levels(paths: dict[str, Path], workers: int) -> dict[str, Path]:
    """Every step of :data:`STEPS` on its splits, resumably; the fully labelled file per split."""
    current = dict(paths)
    for suffix, calculator, options, energy_key, forces_key, splits in STEPS:
        spec = parse_calculator_spec(calculator, options)
        for name in splits:
            target = current[name].with_name(current[name].name.replace(".xyz", f".{suffix}.xyz"))
            if not target.is_file():
                report = label_file(current[name], target, spec, energy_key, forces_key, workers=workers, resume=True)
                LOG.info("%s", report.summary())
            current[name] = target
    return current


def label_pairs(valid: Path, out: Path, n: int, workers: int) -> Path:
    """``n`` displacement pairs of the validation geometries with MP2 energies, resumably."""
    displaced, target = out / "work" / "valid_pairs.bare.xyz", out / "work" / "valid_pairs.mp2.xyz"
    if not displaced.is_file():
        displace_file(valid, displaced, n=n, delta=0.01, seed=0, overwrite=False, fmt=None)
    if not target.is_file():
        spec = parse_calculator_spec("pyscf:mp2/cc-pvdz")
        LOG.info("%s", label_file(displaced, target, spec, "mp2_energy", None, workers=workers, resume=True).summary())
    return target


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = data_set_parser(__doc__, "demo/correlated", 2026, 34, 100, (600.0, 1000.0), 0.02)
    parser.add_argument("--pairs", type=int, default=100, help="validation displacement pairs (MP2 energies)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    opts = sampling_options(args)
    start = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    configs = sample(args.out, args.seed, args.per_molecule, opts, args.workers, MOLECULES, SAMPLING_STREAM)
    parts = split(configs, args.n_valid, args.n_test, args.seed, args.out, SAMPLING_STREAM)
    files = label_levels(parts, args.workers)
    for name in SPLITS:
        atomic_write_text(args.out / f"{name}.xyz", files[name].read_text())
    pairs = label_pairs(files["valid"], args.out, args.pairs, args.workers)
    atomic_write_text(args.out / "valid_pairs.xyz", pairs.read_text())
    measured = gaps(files, ("xtb", "dft", "mp2"))
    atomic_write_text(args.out / "gaps.json", json.dumps(measured, indent=2) + "\n")
    for key, values in measured.items():
        LOG.info("%-12s %s", key, ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
    LOG.info("done in %.0f s: %s", time.perf_counter() - start, ", ".join(str(args.out / f"{n}.xyz") for n in SPLITS))


if __name__ == "__main__":
    main()
