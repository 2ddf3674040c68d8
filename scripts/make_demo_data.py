"""Generate the demo data sets shipped with mace_mf, from scratch and reproducibly.

The demo needs (i) a pretraining set for a tiny self-made "foundation" MACE model and
(ii) a small two-fidelity fine-tuning set. Nothing may be downloaded or copied, so both are
computed here:

* geometries: neutral closed-shell C/H/N/O molecules from ASE's g2 collection, sampled by
  short GFN2-xTB Langevin MD at 500-800 K, then randomly rotated and lightly rattled;
  frames with atoms closer than ``--min-dist`` or with a changed bond graph are rejected;
* ``pretrain.xyz``: GFN1-xTB labels (``energy``, ``forces``), so that the foundation is
  trained on a level of theory *different* from both fine-tuning fidelities;
* ``train/valid/test.xyz``: an independent sample (different random stream) labelled with
  GFN2-xTB (``xtb_energy``, ``xtb_forces``, low fidelity) and density-fitted Kohn-Sham DFT
  from PySCF (``dft_energy``, ``dft_forces``, high fidelity).

Labels are stored as plain ``atoms.info`` / ``atoms.arrays`` entries (eV, eV/Å); no
calculator is attached. Every molecule/trajectory gets its own random stream derived from
``--seed``, and each label is computed with a fresh calculator in a single-threaded worker,
so the output does not depend on the worker count or scheduling (checked: bit-identical
files with 1 and 2 workers). xTB and PySCF are deterministic for a fixed geometry and
thread count; on other machines or BLAS builds expect differences at the level of the SCF
convergence thresholds, far below the label noise that matters here.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.calculator import Calculator
from ase.constraints import FixCom
from ase.data import covalent_radii
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from pyscf import dft, gto, lib
from scipy.spatial.transform import Rotation

from mace_mf.labels.calculators import tblite_calculator

LOG = logging.getLogger("make_demo_data")

# Neutral closed-shell g2 molecules with 3-11 atoms made only of C, H, N and O.
MOLECULES: tuple[str, ...] = (
    "CH4", "H2O", "NH3", "HCN", "CO2", "H2CO", "C2H2", "C2H4", "CH3OH", "H3CNH2", "N2H4",
    "HCOOH", "CH3CN", "CH3CHO", "C2H6", "CH2OCH2", "CH3CH2OH", "CH3OCH3", "CH3COOH",
    "HCOOCH3", "CH3CONH2", "C3H8", "CH3COCH3", "CH3CH2NH2",
)  # fmt: skip

PRETRAIN_STREAM = 0
FINETUNE_STREAM = 1


@dataclass(frozen=True)
class SamplingOptions:
    """MD sampling settings shared by all trajectories."""

    t_min: float
    t_max: float
    timestep_fs: float
    friction_per_fs: float
    equil_steps: int
    stride: int
    rattle: float
    min_dist: float


@dataclass(frozen=True)
class Frame:
    """One sampled geometry together with its xTB labels."""

    molecule: str
    symbols: tuple[str, ...]
    positions: np.ndarray
    xtb_energy: float
    xtb_forces: np.ndarray


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _init_worker() -> None:
    """Pin every worker to one thread (parallelism comes from processes) and enable its log."""
    lib.num_threads(1)
    _setup_logging()


def _bond_graph(atoms: Atoms, scale: float = 1.25) -> np.ndarray:
    """Boolean adjacency matrix from scaled covalent radii."""
    radii = covalent_radii[atoms.numbers]
    dist = atoms.get_all_distances()
    bonded = dist < scale * (radii[:, None] + radii[None, :])
    np.fill_diagonal(bonded, False)
    return bonded


def _is_reasonable(atoms: Atoms, reference_graph: np.ndarray, min_dist: float) -> bool:
    """Reject clashes and broken/formed bonds (keeps every frame a closed-shell molecule)."""
    dist = atoms.get_all_distances()
    np.fill_diagonal(dist, np.inf)
    return bool(dist.min() >= min_dist and np.array_equal(_bond_graph(atoms), reference_graph))


def _xtb(method: str, atoms: Atoms) -> Calculator:
    """Fresh tblite calculator (no SCF guess carried over, so labels are order independent).

    Built by mace_mf's own helper, the one that ``mace-mf label`` uses: neutral closed-shell
    molecules here, so charge 0 and singlet.
    """
    return tblite_calculator(method, atoms)


def xtb_label(symbols: Sequence[str], positions: np.ndarray, method: str) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) of one geometry with a tblite method."""
    atoms = Atoms(symbols=list(symbols), positions=positions)
    atoms.calc = _xtb(method, atoms)
    return float(atoms.get_potential_energy()), np.array(atoms.get_forces())


def sample_molecule(
    name: str, n_frames: int, seed: Sequence[int], opts: SamplingOptions, label_method: str
) -> list[Frame]:
    """Run GFN2-xTB Langevin MD for one molecule and return ``n_frames`` labelled frames."""
    rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
    atoms = molecule(name)
    atoms.set_initial_magnetic_moments(None)
    reference_graph = _bond_graph(atoms)
    temperature = float(rng.uniform(opts.t_min, opts.t_max))
    atoms.calc = _xtb("GFN2-xTB", atoms)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    atoms.set_constraint(FixCom())
    dyn = Langevin(
        atoms,
        timestep=opts.timestep_fs * units.fs,
        temperature_K=temperature,
        friction=opts.friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )
    dyn.run(opts.equil_steps)
    frames: list[Frame] = []
    max_attempts = 20 * n_frames
    for _ in range(max_attempts):
        if len(frames) == n_frames:
            break
        dyn.run(opts.stride)
        candidate = Atoms(symbols=atoms.get_chemical_symbols(), positions=atoms.positions)
        candidate.positions -= candidate.get_center_of_mass()
        candidate.positions = Rotation.random(rng=rng).apply(candidate.positions)
        candidate.positions += rng.normal(scale=opts.rattle, size=candidate.positions.shape)
        if not _is_reasonable(candidate, reference_graph, opts.min_dist):
            continue
        symbols = tuple(candidate.get_chemical_symbols())
        energy, forces = xtb_label(symbols, candidate.positions, label_method)
        frames.append(Frame(name, symbols, candidate.positions.copy(), energy, forces))
    if len(frames) < n_frames:
        raise RuntimeError(f"{name}: only {len(frames)}/{n_frames} acceptable frames at {temperature:.0f} K")
    LOG.info("%-10s %4d frames, T=%.0f K, %s labels", name, n_frames, temperature, label_method)
    return frames


def dft_label(symbols: Sequence[str], positions: np.ndarray, xc: str, basis: str) -> tuple[float, np.ndarray] | None:
    """Density-fitted RKS energy (eV) and forces (eV/Å); ``None`` if the SCF does not converge."""
    mol = gto.M(
        atom=[(s, tuple(float(x) for x in p)) for s, p in zip(symbols, positions, strict=True)],
        basis=basis,
        unit="Angstrom",
        charge=0,
        spin=0,
        verbose=0,
    )
    mf = dft.RKS(mol, xc=xc).density_fit()
    energy_ha = mf.kernel()
    if not mf.converged:
        return None
    grad_ha_bohr = mf.nuc_grad_method().kernel()
    return float(energy_ha) * units.Hartree, -np.asarray(grad_ha_bohr) * units.Hartree / units.Bohr


def _dft_task(args: tuple[tuple[str, ...], np.ndarray, str, str]) -> tuple[float, np.ndarray] | None:
    return dft_label(*args)


def _sample_task(args: tuple[str, int, tuple[int, ...], SamplingOptions, str]) -> list[Frame]:
    return sample_molecule(*args)


def per_molecule_counts(total: int, n_molecules: int) -> list[int]:
    """Split ``total`` frames as evenly as possible over the molecules."""
    return [total // n_molecules + (i < total % n_molecules) for i in range(n_molecules)]


def sample_set(pool: Pool, total: int, seed: int, stream: int, opts: SamplingOptions, label_method: str) -> list[Frame]:
    """Sample ``total`` frames spread over :data:`MOLECULES`, one trajectory per molecule."""
    counts = per_molecule_counts(total, len(MOLECULES))
    tasks = [
        (name, count, (seed, stream, index), opts, label_method)
        for index, (name, count) in enumerate(zip(MOLECULES, counts, strict=True))
        if count > 0
    ]
    return [frame for frames in pool.map(_sample_task, tasks, chunksize=1) for frame in frames]


def to_atoms(frame: Frame, config_id: int) -> Atoms:
    """Bare ``Atoms`` (no calculator) with provenance in ``info``."""
    atoms = Atoms(symbols=list(frame.symbols), positions=frame.positions)
    atoms.info["config_id"] = config_id
    atoms.info["molecule"] = frame.molecule
    return atoms


def write_pretrain(frames: Sequence[Frame], path: Path) -> None:
    """Write the GFN1-xTB foundation set with plain ``energy``/``forces`` keys."""
    configs = []
    for config_id, frame in enumerate(frames):
        atoms = to_atoms(frame, config_id)
        atoms.info["energy"] = frame.xtb_energy
        atoms.arrays["forces"] = frame.xtb_forces
        configs.append(atoms)
    write(path, configs, format="extxyz")
    LOG.info("wrote %d configurations to %s", len(configs), path)


def build_finetune(pool: Pool, frames: Sequence[Frame], xc: str, basis: str) -> list[Atoms]:
    """Attach GFN2-xTB (low) and DFT (high fidelity) labels; drop unconverged DFT frames."""
    tasks = [(frame.symbols, frame.positions, xc, basis) for frame in frames]
    configs: list[Atoms] = []
    start = time.perf_counter()
    for config_id, (frame, result) in enumerate(zip(frames, pool.imap(_dft_task, tasks, chunksize=1), strict=True)):
        if result is None:
            LOG.warning("config %d (%s): DFT SCF not converged, dropped", config_id, frame.molecule)
            continue
        atoms = to_atoms(frame, config_id)
        atoms.info["xtb_energy"] = frame.xtb_energy
        atoms.arrays["xtb_forces"] = frame.xtb_forces
        atoms.info["dft_energy"], atoms.arrays["dft_forces"] = result
        configs.append(atoms)
        if (config_id + 1) % 20 == 0:
            LOG.info("DFT %d/%d done (%.0f s)", config_id + 1, len(frames), time.perf_counter() - start)
    return configs


def split_and_write(configs: list[Atoms], n_valid: int, n_test: int, seed: int, out: Path) -> dict[str, int]:
    """Random split (valid and test get fixed sizes, train the rest), each sorted by config_id."""
    order = np.random.default_rng(np.random.SeedSequence([seed, FINETUNE_STREAM, 10_000])).permutation(len(configs))
    parts = {
        "valid": order[:n_valid],
        "test": order[n_valid : n_valid + n_test],
        "train": order[n_valid + n_test :],
    }
    sizes = {}
    for split, indices in parts.items():
        subset = [configs[i] for i in sorted(indices)]
        write(out / f"{split}.xyz", subset, format="extxyz")
        sizes[split] = len(subset)
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output directory")
    parser.add_argument("--seed", type=int, default=2024, help="base seed for all random streams")
    parser.add_argument("--n-pretrain", type=int, default=2400, help="GFN1-xTB pretraining configurations")
    parser.add_argument("--n-train", type=int, default=160, help="fine-tuning train configurations")
    parser.add_argument("--n-valid", type=int, default=40, help="fine-tuning validation configurations")
    parser.add_argument("--n-test", type=int, default=40, help="fine-tuning test configurations")
    parser.add_argument("--xc", default="PBE0", help="PySCF functional of the high fidelity")
    parser.add_argument("--basis", default="def2-SVP", help="basis set of the high fidelity")
    parser.add_argument("--t-min", type=float, default=500.0, help="lowest MD temperature (K)")
    parser.add_argument("--t-max", type=float, default=800.0, help="highest MD temperature (K)")
    parser.add_argument("--timestep", type=float, default=0.5, help="MD time step (fs)")
    parser.add_argument("--friction", type=float, default=0.02, help="Langevin friction (1/fs)")
    parser.add_argument("--equil-steps", type=int, default=200, help="MD steps before sampling")
    parser.add_argument("--stride", type=int, default=20, help="MD steps between sampled frames")
    parser.add_argument("--rattle", type=float, default=0.02, help="Gaussian rattle on frames (Å)")
    parser.add_argument("--min-dist", type=float, default=0.7, help="smallest allowed distance (Å)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--skip-pretrain", action="store_true", help="only (re)generate the fine-tuning splits")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    _setup_logging()
    args.out.mkdir(parents=True, exist_ok=True)
    opts = SamplingOptions(
        t_min=args.t_min,
        t_max=args.t_max,
        timestep_fs=args.timestep,
        friction_per_fs=args.friction,
        equil_steps=args.equil_steps,
        stride=args.stride,
        rattle=args.rattle,
        min_dist=args.min_dist,
    )
    # Spawned workers read this before loading OpenMP/BLAS, so each one stays single-threaded.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    context = mp.get_context("spawn")
    start = time.perf_counter()
    with context.Pool(args.workers, initializer=_init_worker) as pool:
        if not args.skip_pretrain:
            frames = sample_set(pool, args.n_pretrain, args.seed, PRETRAIN_STREAM, opts, "GFN1-xTB")
            write_pretrain(frames, args.out / "pretrain.xyz")
            LOG.info("pretraining set done after %.0f s", time.perf_counter() - start)
        n_finetune = args.n_train + args.n_valid + args.n_test
        frames = sample_set(pool, n_finetune, args.seed, FINETUNE_STREAM, opts, "GFN2-xTB")
        dft_start = time.perf_counter()
        configs = build_finetune(pool, frames, args.xc, args.basis)
        dft_seconds = time.perf_counter() - dft_start
    sizes = split_and_write(configs, args.n_valid, args.n_test, args.seed, args.out)
    LOG.info(
        "fine-tuning splits %s; %s/%s: %.1f s per configuration per worker",
        sizes,
        args.xc,
        args.basis,
        dft_seconds * args.workers / max(len(frames), 1),
    )
    LOG.info("total time %.0f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
