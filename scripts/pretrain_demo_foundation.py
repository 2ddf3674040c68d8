"""Pretrain the tiny "foundation" MACE model that the mace_mf demo fine-tunes.

Real foundation models cannot be shipped or downloaded for the demo, so we make our own:
a small ScaleShiftMACE (scalar 32x0e hidden features, l<=2 spherical harmonics, two
residual interactions, body order 4) trained with mace-torch's own training CLI on the
GFN1-xTB set written by ``make_demo_data.py``. GFN1-xTB differs from both demo fidelities
(GFN2-xTB, DFT), so the model plays the role of a foundation trained on "some other"
level of theory.

A random ``--heldout-fraction`` of the configurations is never shown to ``mace_run_train``
(it picks its validation subset from the rest); the exported model is scored on it. The
model is saved as a pickled float64 torch module usable by ``mace.calculators.MACECalculator``.
Optionally (``--eval-file``) the zero-shot force error against other labels is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import mace  # noqa: F401  (must be imported before e3nn/torch.load of MACE modules)
import numpy as np
import torch
from ase import Atoms
from ase.io import read, write
from mace.calculators import MACECalculator

LOG = logging.getLogger("pretrain_demo_foundation")

ELEMENTS = (1, 6, 7, 8)
ENERGY_KEY = "REF_energy"
FORCES_KEY = "REF_forces"


def load_reference(path: Path) -> list[Atoms]:
    """Read an extxyz with ``energy``/``forces`` labels into bare Atoms with REF_* keys.

    ASE turns the ``energy``/``forces`` columns into calculator results on reading; the
    REF_* copies are what ``mace_run_train`` is pointed at, avoiding its key renaming.
    """
    configs = []
    for atoms in read(path, index=":", format="extxyz"):
        bare = Atoms(numbers=atoms.numbers, positions=atoms.positions)
        bare.info.update({k: v for k, v in atoms.info.items() if k in ("config_id", "molecule")})
        bare.info[ENERGY_KEY] = float(atoms.get_potential_energy())
        bare.arrays[FORCES_KEY] = np.array(atoms.get_forces())
        configs.append(bare)
    return configs


def split_heldout(configs: list[Atoms], fraction: float, seed: int) -> tuple[list[Atoms], list[Atoms]]:
    """Random (seeded) split into training pool and held-out configurations."""
    order = np.random.default_rng(seed).permutation(len(configs))
    n_heldout = round(fraction * len(configs))
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return [configs[i] for i in train], [configs[i] for i in heldout]


def mace_train_flags(args: argparse.Namespace, train_file: Path, test_file: Path) -> list[str]:
    """Command-line flags for ``mace.cli.run_train`` describing the tiny model and schedule."""
    return [
        "--name=foundation",
        f"--seed={args.seed}",
        f"--train_file={train_file}",
        f"--test_file={test_file}",
        f"--valid_fraction={args.valid_fraction}",
        f"--energy_key={ENERGY_KEY}",
        f"--forces_key={FORCES_KEY}",
        f"--atomic_numbers={list(ELEMENTS)}",
        "--E0s=average",  # least-squares fit of per-element energies to the training set
        "--model=ScaleShiftMACE",
        "--interaction=RealAgnosticResidualInteractionBlock",
        "--interaction_first=RealAgnosticResidualInteractionBlock",
        f"--hidden_irreps={args.channels}x0e",
        "--MLP_irreps=16x0e",
        f"--max_ell={args.max_ell}",
        "--correlation=3",
        "--num_interactions=2",
        f"--r_max={args.r_max}",
        "--scaling=rms_forces_scaling",
        "--loss=weighted",
        "--energy_weight=1.0",
        f"--forces_weight={args.forces_weight}",
        "--stage_two",
        f"--start_stage_two={int(0.75 * args.epochs)}",
        "--stage_two_energy_weight=100.0",
        f"--stage_two_forces_weight={args.forces_weight}",
        f"--stage_two_lr={args.lr / 10}",
        "--ema",
        "--ema_decay=0.99",
        f"--lr={args.lr}",
        f"--batch_size={args.batch_size}",
        f"--valid_batch_size={4 * args.batch_size}",
        f"--max_num_epochs={args.epochs}",
        f"--patience={args.epochs}",
        "--device=cpu",
        f"--default_dtype={args.train_dtype}",
        "--error_table=PerAtomRMSE",
        "--plot=False",
        "--save_cpu",
    ]


def run_mace_train(flags: list[str], workdir: Path, threads: int) -> Path:
    """Run mace's training CLI inside ``workdir`` (it writes logs/checkpoints into its cwd).

    The thread count is pinned: tiny molecular graphs gain little from intra-op threads, and
    oversubscribed OpenMP threads on a busy 2-core machine made training ~20x slower.
    """
    cmd = [sys.executable, "-m", "mace.cli.run_train", f"--work_dir={workdir}", *flags]
    LOG.info("running: %s", " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(cmd, cwd=workdir, check=True, env=env)
    stage_two = workdir / "foundation_stagetwo.model"
    return stage_two if stage_two.exists() else workdir / "foundation.model"


def export_float64(trained: Path, out: Path) -> None:
    """Save the trained model as a pickled float64 CPU module."""
    model = torch.load(trained, weights_only=False, map_location="cpu").double().cpu()
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, out)


def force_and_energy_rmse(
    model_path: Path, configs: Sequence[Atoms], energy_key: str, forces_key: str
) -> dict[str, float | int]:
    """Errors of the model against labels, computed with MACECalculator.

    Besides plain RMSEs, the energy RMSE after a least-squares per-element offset refit is
    given: labels of a different level of theory have different atomic reference energies,
    which fine-tuning absorbs into E0s, so only this number measures relative energies.
    """
    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    energy_err, force_err, forces_ref, n_atoms, composition = [], [], [], [], []
    for config in configs:
        atoms = Atoms(numbers=config.numbers, positions=config.positions)
        atoms.calc = calc
        energy_err.append(atoms.get_potential_energy() - config.info[energy_key])
        force_err.append((atoms.get_forces() - config.arrays[forces_key]).ravel())
        forces_ref.append(config.arrays[forces_key].ravel())
        n_atoms.append(len(atoms))
        composition.append([np.count_nonzero(config.numbers == z) for z in ELEMENTS])
    energy_err_arr, n_atoms_arr = np.array(energy_err), np.array(n_atoms)
    per_atom_composition = np.array(composition, dtype=float) / n_atoms_arr[:, None]
    per_atom_err = energy_err_arr / n_atoms_arr
    offsets = np.linalg.lstsq(per_atom_composition, per_atom_err, rcond=None)[0]
    refit_err = per_atom_err - per_atom_composition @ offsets
    force_err_all = np.concatenate(force_err)
    return {
        "n_configs": len(configs),
        "energy_rmse_mev_per_atom": 1e3 * float(np.sqrt(np.mean(per_atom_err**2))),
        "energy_rmse_after_e0_refit_mev_per_atom": 1e3 * float(np.sqrt(np.mean(refit_err**2))),
        "force_rmse_mev_per_A": 1e3 * float(np.sqrt(np.mean(force_err_all**2))),
        "force_rms_of_data_mev_per_A": 1e3 * float(np.sqrt(np.mean(np.concatenate(forces_ref) ** 2))),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("demo/pretrain.xyz"), help="GFN1-xTB extxyz")
    parser.add_argument("--out", type=Path, default=Path("demo/foundation.model"), help="output model")
    parser.add_argument("--seed", type=int, default=2024, help="seed for the split and for mace")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate (stage two uses lr/10)")
    parser.add_argument("--forces-weight", type=float, default=100.0)
    parser.add_argument("--channels", type=int, default=32, help="scalar hidden channels (Nx0e)")
    parser.add_argument("--max-ell", type=int, default=2, help="max degree of the spherical harmonics")
    parser.add_argument("--r-max", type=float, default=4.5, help="cutoff radius (Å)")
    parser.add_argument("--heldout-fraction", type=float, default=0.1, help="never seen in training")
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="mace's validation subset")
    parser.add_argument(
        "--train-dtype",
        choices=("float32", "float64"),
        default="float32",
        help="training precision (the exported model is always float64)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads for training and eval")
    parser.add_argument("--workdir", type=Path, help="keep mace's run directory here (default: temp)")
    parser.add_argument("--eval-only", action="store_true", help="skip training; evaluate the existing --out model")
    parser.add_argument(
        "--eval-file",
        type=Path,
        help="extxyz with '<prefix>_energy'/'<prefix>_forces' labels for zero-shot errors",
    )
    parser.add_argument("--eval-prefixes", nargs="+", default=["xtb", "dft"], help="label prefixes in --eval-file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    train, heldout = split_heldout(load_reference(args.data), args.heldout_fraction, args.seed)
    report: dict[str, object] = {}
    if not args.eval_only:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mace_pretrain_") as tmp:
            workdir = (args.workdir or Path(tmp)).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
            write(workdir / "train.xyz", train, format="extxyz")
            write(workdir / "heldout.xyz", heldout, format="extxyz")
            flags = mace_train_flags(args, workdir / "train.xyz", workdir / "heldout.xyz")
            export_float64(run_mace_train(flags, workdir, args.threads), args.out)
        report["training_seconds"] = round(time.perf_counter() - start)
        LOG.info("saved %s (%.0f kB)", args.out, args.out.stat().st_size / 1024)
    report["heldout"] = force_and_energy_rmse(args.out, heldout, ENERGY_KEY, FORCES_KEY)
    if args.eval_file is not None:
        configs = read(args.eval_file, index=":", format="extxyz")
        for prefix in args.eval_prefixes:
            report[f"zero_shot_{prefix}"] = force_and_energy_rmse(
                args.out, configs, f"{prefix}_energy", f"{prefix}_forces"
            )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
