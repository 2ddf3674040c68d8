"""How many displacement pairs does a given resolution of the force estimate take, on real errors?

A pair measures one force component of a model's error, ``ΔF(x)·u``, with ``u`` uniform on the unit
sphere of the 3N coordinates, so the pairs' estimate of a validation force RMSE is a sampled
quantity. This script takes models whose force errors are known on every atom (real models, and one
level's force labels taken as a model of another's), draws the pairs ``mace-mf displace`` would
draw (each geometry once before any twice, seeded directions), and measures, for 10 to 800 pairs:

* **spread**: the 95th percentile over 400 draws of ``|estimate / true RMSE - 1|``, the resolution
  the pairs actually give;
* **interval**: the median relative half-width of the 95 % bootstrap interval that mace-mf reports
  (:func:`mace_mf.evaluation.pairs.rmse_interval`), and how often it contains the true RMSE;
* **pairs for ±5 %**: the median of what mace-mf reports a user would need.

The finite difference itself is left out (``ΔF·u`` is computed from the forces; its truncation error,
1.4 meV/Å at δ = 0.01 Å, is measured in docs/benchmarks.md), so this isolates the sampling.

    python scripts/benchmark_pair_resolution.py --out runs/pair-resolution      # ~2 min on 2 cores

Sets (each skipped, with the reason, where its files are absent): the bundled demo and seed-regime
data (their low level's forces as a model of their high level's; the demo foundation zero-shot),
and from ../shared, ethanol (the SPICE foundation zero-shot against the file's DFT forces) and
pyseqm (PM6 forces as a model of DFT's). Results: ``<out>/resolution.json`` and ``<out>/resolution.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SIZES = (10, 20, 40, 100, 200, 400, 800)
DRAWS = 400


@dataclass(frozen=True)
class Case:
    name: str
    files: tuple[Path, ...]
    true_key: str
    predicted: str  # a forces key of the same file, or a MACE model file
    limit: int = 400  # geometries read (the first ones of the files)


CASES = (
    Case("demo: xtb labels vs PBE0", (ROOT / "demo/valid.xyz", ROOT / "demo/test.xyz"), "dft_forces", "xtb_forces"),
    Case(
        "demo: foundation vs PBE0",
        (ROOT / "demo/valid.xyz", ROOT / "demo/test.xyz"),
        "dft_forces",
        str(ROOT / "demo/foundation.model"),
    ),
    Case(
        "seed regime: TZVP labels vs QZVP",
        (ROOT / "demo/seed_regime/valid.xyz", ROOT / "demo/seed_regime/test.xyz"),
        "qzvp_forces",
        "tzvp_forces",
    ),
    Case(
        "ethanol: SPICE foundation vs PBE",
        (SHARED / "data/botnet_ethanol/test_MD.xyz",),
        "forces",
        str(SHARED / "models/spice_small_2022.model"),
    ),
    Case("pyseqm: PM6 labels vs DFT", (SHARED / "data/pyseqm_chno/valid.xyz",), "dft_forces", "pm6_forces"),
)


def force_errors(case: Case) -> list[np.ndarray]:
    """Per geometry, the predicted minus the true forces (eV/Å, ``[n_atoms, 3]``)."""
    frames = [a for path in case.files for a in ase.io.read(path, ":")][: case.limit]
    if not case.predicted.endswith(".model"):
        return [a.arrays[case.predicted] - a.arrays[case.true_key] for a in frames]
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=case.predicted, device="cpu", default_dtype="float64")
    errors = []
    for atoms in frames:
        # ASE reads a "forces" column into a single-point calculator, not into arrays
        truth = atoms.arrays[case.true_key] if case.true_key in atoms.arrays else atoms.get_forces()
        atoms.calc = calc
        errors.append(atoms.get_forces() - truth)
    return errors


def measure(errors: list[np.ndarray], seed: int = 0) -> list[dict[str, float]]:
    from mace_mf.evaluation.pairs import rmse_interval

    truth = float(np.sqrt(np.mean(np.concatenate([e.ravel() for e in errors]) ** 2)))
    rng = np.random.default_rng(seed)
    rows = []
    for n in SIZES:
        ratios, halves, covered, needed = [], [], [], []
        for _ in range(DRAWS):
            order = np.concatenate([rng.permutation(len(errors)) for _ in range(-(-n // len(errors)))])[:n]
            squared, weights = np.empty(n), np.empty(n)
            for i, g in enumerate(order):
                u = rng.normal(size=errors[g].size)
                u /= np.linalg.norm(u)
                squared[i] = float(errors[g].ravel() @ u) ** 2 * 1e6  # (meV/Å)²
                weights[i] = errors[g].size
            estimate = float(np.sqrt((weights * squared).sum() / weights.sum()))
            low, high, pairs = rmse_interval(squared, weights, seed=int(rng.integers(1 << 31)))
            ratios.append(estimate / (truth * 1000.0))
            halves.append((high - low) / 2.0 / estimate)
            covered.append(low <= truth * 1000.0 <= high)
            needed.append(pairs)
        deviation = np.abs(np.array(ratios) - 1.0)
        rows.append(
            {
                "pairs": n,
                "spread_95": float(np.percentile(deviation, 95)),
                "half_width_median": float(np.median(halves)),
                "coverage": float(np.mean(covered)),
                "pairs_for_5pct_median": float(np.median(needed)),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    for case in CASES:
        absent = [str(p) for p in (*case.files, Path(case.predicted)) if p.suffix and not p.exists()]
        if absent:
            print(f"{case.name}: skipped, {', '.join(absent)} absent", flush=True)
            continue
        errors = force_errors(case)
        rmse = float(np.sqrt(np.mean(np.concatenate([e.ravel() for e in errors]) ** 2))) * 1000.0
        results[case.name] = {"geometries": len(errors), "f_rmse_meV_A": rmse, "sizes": measure(errors)}
        print(json.dumps({case.name: results[case.name]}, indent=1), flush=True)
    (args.out / "resolution.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"`{' '.join(sys.argv)}`; each row: 95th percentile of |estimate/true − 1| over {DRAWS} draws "
        "(median 95 % bootstrap half-width; coverage of the true RMSE by that interval)",
        "",
        "| pairs | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for i, n in enumerate(SIZES):
        cells = []
        for entry in results.values():
            row = entry["sizes"][i]  # type: ignore[index]
            cells.append(f"±{row['spread_95']:.0%} ({row['half_width_median']:.0%}; {row['coverage']:.0%})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "| set | geometries | true F RMSE (meV/Å) | pairs for ±5 % (median over draws of 40 / 200 pairs) |"]
    lines.append("|---|---|---|---|")
    for name, entry in results.items():
        by_size = {row["pairs"]: row for row in entry["sizes"]}  # type: ignore[index]
        lines.append(
            f"| {name} | {entry['geometries']} | {entry['f_rmse_meV_A']:.0f} | "  # type: ignore[index]
            f"{by_size[40]['pairs_for_5pct_median']:.0f} / {by_size[200]['pairs_for_5pct_median']:.0f} |"
        )
    (args.out / "resolution.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
