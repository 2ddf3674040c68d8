"""The seed paper's regime, measured: DFT-quality forces + a higher level's energies.

Data: ``demo/seed_regime/`` (``scripts/make_seed_regime_data.py``): a ladder of GFN2-xTB,
PBE0/def2-SVP, PBE0/def2-TZVP and PBE0/def2-QZVP energies and forces on the same 240 geometries.
The high level is QZVP throughout; its forces are scored on the test split and trained on only by
the oracle (``sf-high-ef``).

1. The seed regime, ``recipes/seed_regime.yaml`` (TZVP forces, QZVP energies): every arm of
   ``mace-mf bench`` (zero-shot, energies only, oracle, low only, ``mf`` with each coupling,
   upstream ``mace-mh``), three seeds, and a learning curve with the QZVP energies on 5 / 20 / 100 %
   of the training geometries (energies only, ``mf`` and ``mace-mh``).
2. The label-gap ladder: the same recipe with the low level swapped for SVP and for GFN2-xTB (energies
   only, oracle, low only, ``mf``; three seeds), so the closure can be read against how far the low
   level's forces are from the high level's.

    python scripts/benchmark_seed_regime.py                    # both parts (~1 h on 2 cores)
    python scripts/benchmark_seed_regime.py --parts ladder --seeds 0

Results: ``<out>/<rung>/results.{json,md}`` per bench, and ``<out>/seed_regime.{json,md}`` with the
targets of docs/benchmarks.md ("The seed regime") checked. Finished runs are reused, so the script
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "seed_regime.yaml"
ARMS = "zero-shot,sf-high-e,sf-high-ef,sf-low,mf,mf-delta,mf-independent,mace-mh"
LADDER_ARMS = "sf-high-e,sf-high-ef,sf-low,mf"
FRACTION_ARMS = "sf-high-e,mf,mace-mh"
COMMON = ["md_check.enabled=false"]


def rung_recipe(low: str, folder: Path) -> Path:
    """``recipes/seed_regime.yaml`` with ``low`` (svp, xtb) in place of tzvp; paths made absolute."""
    tree = yaml.safe_load(RECIPE.read_text())
    spec = tree["fidelities"].pop("tzvp")
    spec.update(energy_key=f"{low}_energy", forces_key=f"{low}_forces")
    tree["fidelities"] = {low: spec, **tree["fidelities"]}
    tree["name"] = f"seed-regime-{low}"
    tree["export"]["fidelities"] = ["qzvp", low]
    tree["foundation"]["model"] = str((RECIPE.parent / tree["foundation"]["model"]).resolve())
    for split in ("train", "valid", "test"):
        tree["data"][split] = str((RECIPE.parent / tree["data"][split]).resolve())
    path = folder / f"seed_regime_{low}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def row(result: dict, low: str) -> dict:
    """One rung: the label gap and the high level's test force RMSE of the main arms."""
    s = result["summary"]
    gap = result["label_gap"].get("test", {}).get("f_rmse_meV_A")

    def f(arm: str) -> tuple[float | None, float | None]:
        entry = s.get(arm, {})
        return entry.get("test/f_rmse_meV_A"), entry.get("test/f_rmse_meV_A_std")

    return {
        "low": low,
        "gap_test_meV_A": gap,
        **{arm: f(arm) for arm in ("sf-high-e", "sf-high-ef", "sf-low", "mf")},
        "closure_test": s.get("mf", {}).get("test/closure"),
        "closure_valid": s.get("mf", {}).get("valid/closure"),
    }


def targets(result: dict) -> list[tuple[str, str, bool]]:
    """Issue 15's targets, measured on the test split of the seed-regime bench."""
    s = result["summary"]
    mf, oracle, eo = (s.get(a, {}).get("test/f_rmse_meV_A") for a in ("mf", "sf-high-ef", "sf-high-e"))
    closure = s.get("mf", {}).get("test/closure")
    out = []
    if None not in (mf, oracle, closure):
        out.append(("closure ≥ 0.9 at 100 %", f"{closure:.2f}", closure >= 0.9))
        out.append(
            ("mf ≤ 1.10 × oracle at 100 %", f"{mf:.0f} vs {1.1 * oracle:.0f} ({mf / oracle:.2f} ×)", mf <= 1.1 * oracle)
        )
    mf5 = s.get("mf@0.05", {}).get("test/f_rmse_meV_A")
    if mf5 is not None and eo is not None:
        out.append(("mf with 5 % beats energies only with 100 %", f"{mf5:.0f} vs {eo:.0f}", mf5 < eo))
    for key, label in (("", "100 %"), ("@0.2", "20 %"), ("@0.05", "5 %")):
        ours, theirs = (s.get(f"{a}{key}", {}).get("test/f_rmse_meV_A") for a in ("mf", "mace-mh"))
        if ours is not None and theirs is not None:
            out.append((f"mf beats mace-mh at {label}", f"{ours:.0f} vs {theirs:.0f}", ours < theirs))
    return out


def fmt(value: tuple[float | None, float | None]) -> str:
    mean, std = value
    return "–" if mean is None else f"{mean:.0f} ± {std or 0:.0f}"


def markdown(report: dict) -> str:
    lines = ["# The seed regime (scripts/benchmark_seed_regime.py)", ""]
    if report.get("targets"):
        lines += ["| target (test split) | measured | met |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {'yes' if ok else 'no'} |" for name, value, ok in report["targets"]]
        lines.append("")
    if report.get("ladder"):
        lines += [
            "| low level (forces) | label gap vs QZVP, test (meV/Å) | QZVP energies only | oracle | low head | "
            "`mf` | closure test | closure valid |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["ladder"]:
            gap = "–" if r["gap_test_meV_A"] is None else f"{r['gap_test_meV_A']:.0f}"
            closure = [("–" if c is None else f"{c:.2f}") for c in (r["closure_test"], r["closure_valid"])]
            lines.append(
                f"| {r['low']} | {gap} | {fmt(r['sf-high-e'])} | {fmt(r['sf-high-ef'])} | {fmt(r['sf-low'])} | "
                f"{fmt(r['mf'])} | {closure[0]} | {closure[1]} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "seed-regime")
    parser.add_argument("--parts", default="regime,ladder", help="regime, ladder or both")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.05,0.2,1")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    args.out = args.out.resolve()
    if not (ROOT / "demo" / "seed_regime" / "train.xyz").is_file():
        print("error: demo/seed_regime/ not found; run scripts/make_seed_regime_data.py", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from mace_mf.workflows.bench import run_benchmark

    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    report: dict = {"targets": [], "ladder": []}
    if "regime" in parts:
        fractions = [float(f) for f in args.fractions.split(",")]
        result = run_benchmark(
            RECIPE, args.out / "tzvp", ARMS.split(","), seeds, fractions, FRACTION_ARMS.split(","), COMMON,
            workers=args.workers,
        )  # fmt: skip
        report["targets"] = targets(result)
        report["ladder"].append(row(result, "tzvp"))
    if "ladder" in parts:
        for low in ("svp", "xtb"):
            recipe = rung_recipe(low, args.out / "recipes")
            result = run_benchmark(
                recipe, args.out / low, LADDER_ARMS.split(","), seeds, [1.0], [], COMMON, workers=args.workers
            )
            report["ladder"].append(row(result, low))
    (args.out / "seed_regime.json").write_text(json.dumps(report, indent=2))
    (args.out / "seed_regime.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
