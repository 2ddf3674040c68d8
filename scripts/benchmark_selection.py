"""Do chosen geometries make a better use of the high-level budget than random ones?

For each data set, `mace-mf bench` trains the recipe's `mf` arm with the high level's energies kept on
5 % and 20 % of the training geometries: a random subset (`mf`, as `label_fraction` draws it) against
the subsets `mace-mf select` would choose (`mf-fps`, `mf-disagreement`: `label_selection` with the
foundation as the model). Every run keeps the low level's labels on all geometries; the high level's
test energies and forces (never trained on) score them. The time `mace-mf select` takes for 20 % of
pyseqm's training pool (2337 geometries, SPICE foundation) is measured end to end, in a fresh process.

    python scripts/benchmark_selection.py                                  # seed regime and pyseqm, 3 seeds
    python scripts/benchmark_selection.py --datasets seed --seeds 0 --methods fps

Data sets: ``seed`` (`recipes/seed_regime.yaml`, in the bench folder of
`scripts/benchmark_seed_regime.py`, so its random arms are shared) and ``pyseqm``
(`recipes/pyseqm_mf.yaml`, 3 epochs in float32, needs ``../shared``). Results:
``<out>/selection.json`` and ``<out>/selection.md``.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = {
    "seed": (ROOT / "recipes/seed_regime.yaml", ["md_check.enabled=false"], ROOT / "runs/seed-regime/tzvp"),
    "pyseqm": (
        ROOT / "recipes/pyseqm_mf.yaml",
        ["training.epochs=3", "dtype=float32", "num_threads=1", "md_check.enabled=false"],
        ROOT / "runs/selection-pyseqm",
    ),
}


def time_selection(fraction: float, method: str) -> dict | None:
    """Wall time of `mace-mf select` for a fraction of pyseqm's training pool, in a fresh process,
    with the machine's load average beside it (the figure is only comparable at the same load)."""
    pool = SHARED / "data/pyseqm_chno/train.xyz"
    model = SHARED / "models/spice_small_2022.model"
    if not pool.is_file() or not model.is_file():
        return None
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "mace_mf.cli", "select", str(pool), f"{folder}/chosen.xyz"]
        command += ["--budget", str(fraction), "--model", str(model), "--method", method]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
    return {"fraction": fraction, "method": method, "pool": 2337, "wall_s": round(wall, 1), "load": round(load, 1)}


def compare(summary: dict, fractions: list[float], methods: list[str]) -> list[dict]:
    """Per fraction and method: the selected arm's test errors against the random arm's."""
    rows = []
    for fraction in fractions:
        random = summary.get(f"mf@{fraction:g}")
        for method in methods:
            chosen = summary.get(f"mf-{method}@{fraction:g}")
            if random is None or chosen is None:
                continue
            row = {"fraction": fraction, "method": method}
            for metric in ("f_rmse_meV_A", "e_rmse_meV_atom"):
                row[f"random {metric}"] = (random[f"test/{metric}"], random[f"test/{metric}_std"])
                row[f"{method} {metric}"] = (chosen[f"test/{metric}"], chosen[f"test/{metric}_std"])
            row["beats random"] = all(
                chosen[f"test/{m}"] < random[f"test/{m}"] for m in ("f_rmse_meV_A", "e_rmse_meV_atom")
            )
            rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = ["# Choosing the geometries for the high-level labels (scripts/benchmark_selection.py)", ""]
    for t in results.get("timing") or []:
        lines.append(
            f"`mace-mf select --method {t['method']}` of {t['fraction']:.0%} of pyseqm's {t['pool']}-geometry "
            f"pool: {t['wall_s']} s (load average {t['load']} at the start)."
        )
    lines.append("")
    for name, rows in results["datasets"].items():
        if isinstance(rows, str):
            lines += [f"## {name}: skipped ({rows})", ""]
            continue
        lines += [
            f"## {name}",
            "",
            "| high-level energies on | method | F RMSE test, random (meV/Å) | F RMSE test, chosen | "
            "E RMSE test, random (meV/atom) | E RMSE test, chosen | chosen beats random on both |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            m = r["method"]
            fr, fc = r["random f_rmse_meV_A"], r[f"{m} f_rmse_meV_A"]
            er, ec = r["random e_rmse_meV_atom"], r[f"{m} e_rmse_meV_atom"]
            lines.append(
                f"| {r['fraction']:.0%} | `{m}` | {fr[0]:.0f} ± {fr[1]:.0f} | {fc[0]:.0f} ± {fc[1]:.0f} | "
                f"{er[0]:.1f} ± {er[1]:.1f} | {ec[0]:.1f} ± {ec[1]:.1f} | {'yes' if r['beats random'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "selection")
    parser.add_argument("--datasets", default="seed,pyseqm")
    parser.add_argument("--methods", default="fps,disagreement")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.05,0.2")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    args.out = args.out.resolve()  # recipe overrides name files under it; relative paths would resolve elsewhere
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from mace_mf.workflows.bench import run_benchmark

    methods = [m for m in args.methods.split(",") if m]
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    timed = [time_selection(0.2, m) for m in methods if m != "disagreement"]  # disagreement needs --forces-key
    results: dict = {"timing": [t for t in timed if t is not None], "datasets": {}}
    for name in [n for n in args.datasets.split(",") if n]:
        recipe, common, bench_out = DATASETS[name]
        if name == "pyseqm" and not (SHARED / "data/pyseqm_chno").is_dir():
            results["datasets"][name] = "../shared/data/pyseqm_chno not found"
            continue
        if name == "seed" and not (ROOT / "demo/seed_regime/train.xyz").is_file():
            results["datasets"][name] = "demo/seed_regime not generated (scripts/make_seed_regime_data.py)"
            continue
        arms = ["mf", *(f"mf-{m}" for m in methods)]
        result = run_benchmark(recipe, bench_out, [], seeds, fractions, arms, common, workers=args.workers)
        results["datasets"][name] = compare(result["summary"], fractions, methods)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "selection.json").write_text(json.dumps(results, indent=2))
        (args.out / "selection.md").write_text(markdown(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection.json").write_text(json.dumps(results, indent=2))
    (args.out / "selection.md").write_text(markdown(results))
    print((args.out / "selection.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
