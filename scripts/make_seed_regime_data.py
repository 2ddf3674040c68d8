"""Build the seed-regime data set: DFT-quality forces plus higher-level energies on the same geometries.

The seed paper (Messerly et al., MLST 2025) trains on low-level DFT energies and forces and
high-level energies on the same geometries, and scores the high head on high-level forces that were
never trained on. This script makes such a set from scratch, with ``mace-mf label`` (the labelling
engine of :mod:`mace_mf.labels.labelling`, resumable) and PySCF:

* geometries: 24 C/H/N/O molecules of ASE's g2 collection with 3-7 atoms (closed shells and three
  radicals, several absent from the demo foundation's pretraining set), sampled by GFN2-xTB Langevin
  MD at 800-1500 K (hotter than the foundation's 500-800 K), randomly rotated and rattled; frames
  with atoms closer than 0.7 Å or a changed bond graph are rejected (the sampling of
  ``scripts/make_demo_data.py``, another random stream);
* a ladder of four levels on every geometry, energies and forces each:
  ``xtb`` GFN2-xTB (tblite), ``svp`` PBE0/def2-SVP, ``tzvp`` PBE0/def2-TZVP, ``qzvp`` PBE0/def2-QZVP
  (density-fitted RKS/UKS, grid level 3, SCF to 1e-10 Ha; ``mace_mf.labels.pyscf_calculator``). A recipe
  picks its low and high level from the ladder (``recipes/seed_regime.yaml``: ``tzvp`` forces and
  ``qzvp`` energies, a basis-set step up); high-level forces on the training geometries exist only
  for the oracle arm of ``mace-mf bench``, and are scored, never trained on, by every other arm;
* a seeded split into train/valid/test (160/40/40), then the label gaps between the levels
  (force RMSE, and energy RMSE per atom after a per-element offset fit) printed and written to
  ``gaps.json``.

Every step is resumable: the sampled geometries are written once, and each labelling step keeps
its results in ``<file>.partial.jsonl`` as they arrive, so running the script again after a kill
continues where it stopped. Work files live in ``<out>/work/``; the final ``train.xyz``,
``valid.xyz``, ``test.xyz`` and ``gaps.json`` are written atomically at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ase.io
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import SamplingOptions, per_molecule_counts, sample_molecule, to_atoms

from mace_mf.files import atomic_write_text
from mace_mf.labels.calculators import parse_calculator_spec
from mace_mf.labels.labelling import label_file

LOG = logging.getLogger("make_seed_regime_data")

MOLECULES: tuple[str, ...] = (
    "H2O", "NH3", "CH4", "HCN", "CO2", "H2CO", "C2H2", "C2H4", "CH3OH", "N2H4", "HCOOH", "CH3CN",
    "H2O2", "H2CCO", "N2O", "NCCN", "OCHCHO", "CH3NO2", "CH3CHO", "CH2OCH2", "H3CNH2",
    "CH3", "NH2", "HCO",
)  # fmt: skip
# name -> PySCF level; the xTB labels come with the MD sampling.
LEVELS: dict[str, str] = {"svp": "pbe0/def2-svp", "tzvp": "pbe0/def2-tzvp", "qzvp": "pbe0/def2-qzvp"}
SPLITS = ("test", "valid", "train")  # the scoring splits first: a partial ladder is already usable
SAMPLING_STREAM = 7  # an independent stream of make_demo_data's seed scheme (the demo uses 0 and 1)


def sample(
    out: Path,
    seed: int,
    per_molecule: int,
    opts: SamplingOptions,
    workers: int,
    molecules: Sequence[str] = MOLECULES,
    stream: int = SAMPLING_STREAM,
) -> list:
    """Sampled geometries of ``molecules`` with GFN2-xTB labels, from random stream ``stream``
    (``geometries.xyz``, written once and reused)."""
    path = out / "work" / "geometries.xyz"
    if path.is_file():
        return ase.io.read(path, ":")
    counts = per_molecule_counts(per_molecule * len(molecules), len(molecules))
    tasks = [
        (name, n, (seed, stream, i), opts, "GFN2-xTB")
        for i, (name, n) in enumerate(zip(molecules, counts, strict=True))
    ]
    with mp.get_context("spawn").Pool(workers) as pool:
        frames = [f for batch in pool.starmap(sample_molecule, tasks, chunksize=1) for f in batch]
    configs = []
    for config_id, frame in enumerate(frames):
        atoms = to_atoms(frame, config_id)
        atoms.info["xtb_energy"] = frame.xtb_energy
        atoms.arrays["xtb_forces"] = frame.xtb_forces
        configs.append(atoms)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(path) + ".tmp", configs, format="extxyz")
    os.replace(str(path) + ".tmp", path)
    LOG.info("sampled %d geometries of %d molecules", len(configs), len(molecules))
    return configs


def split(
    configs: list, n_valid: int, n_test: int, seed: int, out: Path, stream: int = SAMPLING_STREAM
) -> dict[str, Path]:
    """Seeded random split, each file sorted by config_id (``work/<split>.xtb.xyz``)."""
    order = np.random.default_rng(np.random.SeedSequence([seed, stream, 10_000])).permutation(len(configs))
    parts = {"valid": order[:n_valid], "test": order[n_valid : n_valid + n_test], "train": order[n_valid + n_test :]}
    paths = {}
    for name, indices in parts.items():
        paths[name] = out / "work" / f"{name}.xtb.xyz"
        if not paths[name].is_file():
            ase.io.write(paths[name], [configs[i] for i in sorted(indices)], format="extxyz")
    return paths


def label_ladder(paths: dict[str, Path], workers: int) -> dict[str, Path]:
    """Add every PySCF level to every split, resumably; return the fully labelled file per split."""
    current = dict(paths)
    for level, spec_text in LEVELS.items():
        spec = parse_calculator_spec(f"pyscf:{spec_text}")
        for name in SPLITS:
            target = current[name].with_name(current[name].name.replace(".xyz", f".{level}.xyz"))
            if not target.is_file():
                report = label_file(
                    current[name], target, spec, f"{level}_energy", f"{level}_forces", workers=workers, resume=True
                )
                LOG.info("%s", report.summary())
            current[name] = target
    return current


def gaps(files: dict[str, Path], names: Sequence[str] = ("xtb", *LEVELS)) -> dict[str, dict[str, float]]:
    """Force RMSE (meV/Å) and per-atom energy RMSE after a per-element offset fit (meV/atom) between
    every pair of ``names`` over all splits (forces where both levels have them), and each level's
    force RMS."""
    frames = [a for name in SPLITS for a in ase.io.read(files[name], ":")]
    counts = np.array([np.bincount(a.numbers, minlength=9) for a in frames], dtype=float)
    natoms = counts.sum(1)
    result: dict[str, dict[str, float]] = {}
    for level in names:
        forces = np.concatenate([a.arrays[f"{level}_forces"].ravel() for a in frames if f"{level}_forces" in a.arrays])
        result[level] = {"force_rms_meV_A": float(1000 * np.sqrt((forces**2).mean()))}
    for i, low in enumerate(names):
        for high in names[i + 1 :]:
            both = [a for a in frames if f"{high}_forces" in a.arrays and f"{low}_forces" in a.arrays]
            df = np.concatenate([(a.arrays[f"{high}_forces"] - a.arrays[f"{low}_forces"]).ravel() for a in both])
            de = np.array([a.info[f"{high}_energy"] - a.info[f"{low}_energy"] for a in frames])
            residual = de - counts @ np.linalg.lstsq(counts, de, rcond=None)[0]
            result[f"{low}->{high}"] = {
                "force_rmse_meV_A": float(1000 * np.sqrt((df**2).mean())),
                "energy_rmse_meV_atom": float(1000 * np.sqrt(((residual / natoms) ** 2).mean())),
            }
    return result


def data_set_parser(
    doc: str, out: str, seed: int, per_molecule: int, n_test: int, t_range: tuple[float, float], rattle: float
) -> argparse.ArgumentParser:
    """The options every data-set script of this kind takes, with its own defaults."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(out), help="output directory")
    parser.add_argument("--seed", type=int, default=seed, help="base seed of every random stream")
    parser.add_argument("--per-molecule", type=int, default=per_molecule, help="geometries per molecule")
    parser.add_argument("--n-valid", type=int, default=40, help="validation geometries")
    parser.add_argument("--n-test", type=int, default=n_test, help="test geometries")
    parser.add_argument("--t-min", type=float, default=t_range[0], help="lowest MD temperature (K)")
    parser.add_argument("--t-max", type=float, default=t_range[1], help="highest MD temperature (K)")
    parser.add_argument("--rattle", type=float, default=rattle, help="Gaussian rattle on frames (Å)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="labelling worker processes")
    return parser


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """GFN2-xTB Langevin MD as ``scripts/make_demo_data.py`` runs it, at the script's temperatures and rattle."""
    return SamplingOptions(
        t_min=args.t_min,
        t_max=args.t_max,
        timestep_fs=0.5,
        friction_per_fs=0.02,
        equil_steps=200,
        stride=20,
        rattle=args.rattle,
        min_dist=0.7,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = data_set_parser(__doc__, "demo/seed_regime", 2024, 10, 40, (800.0, 1500.0), 0.03)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    opts = sampling_options(args)
    start = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    configs = sample(args.out, args.seed, args.per_molecule, opts, args.workers)
    files = label_ladder(split(configs, args.n_valid, args.n_test, args.seed, args.out), args.workers)
    for name in SPLITS:
        atomic_write_text(args.out / f"{name}.xyz", files[name].read_text())
    measured = gaps(files)
    atomic_write_text(args.out / "gaps.json", json.dumps(measured, indent=2) + "\n")
    for key, values in measured.items():
        LOG.info("%-12s %s", key, ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
    LOG.info("done in %.0f s: %s", time.perf_counter() - start, ", ".join(str(args.out / f"{n}.xyz") for n in SPLITS))


if __name__ == "__main__":
    main()
