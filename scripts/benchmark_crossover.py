"""Multi-fidelity or energies alone? The learning curve across the crossover, and the recipe `bench` picks.

With few high-level energies, the low level's forces carry a multi-fidelity model far past what the
energies teach alone; with many, a good foundation fine-tuned on the energies alone can overtake it,
because the multi-fidelity high head inherits the low level's forces and their error. Where the
crossover lies depends on the data, so ``mace-mf bench`` has to find it from what a user has: the
high level's energies and displacement pairs (never its forces).

For each data set and each fraction of its high-level energies (a seeded subset of the training
geometries keeps them; the low level stays on all), ``mace-mf bench`` trains the candidate arms

* ``sf-high-e``: the high-level energies alone (one end);
* ``mf``: the recipe, tied multi-fidelity learning (the other end);
* ``mf-low<s>``: the recipe with every low-level term (its energy and force weights, the coupling
  strength to it) scaled by ``s`` (between the ends: 1 is ``mf``, 0 trains what ``sf-high-e`` trains),

over the seeds, and picks one per fraction on the validation pairs. The pick is then scored on
what it could not see, the test split's high-level forces:

* **never loses**: the pick's test force RMSE within 5 % of the better end's, at every fraction;
* **gain**: how much better than both ends the pick, and the best candidate, are.

Data sets (each skipped, with the reason, when its files are absent):

* ``correlated``: `recipes/correlated_mf.yaml` in float32 (B3LYP/6-31G* → MP2/cc-pVDZ, SPICE
  foundation; the pairs ship with the data, `scripts/make_correlated_data.py`);
* ``seed``, ``ethanol``, ``pyseqm``: the sets of `scripts/benchmark_verdict.py`, their high-level
  forces removed from training and validation and the pairs labelled as there (pyseqm's DFT level is
  undocumented, so its pair energies are projected from the true forces; that set checks the choice,
  not the finite difference).

    python scripts/benchmark_crossover.py --datasets correlated --seeds 0,1,2 --out runs/crossover

Results: ``<out>/crossover.json``, ``<out>/crossover.md`` and ``<out>/<set>/learning_curve.png``;
each set's bench in ``<out>/<set>/bench`` (resumable: finished runs are never rerun).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_verdict import DATASETS as VERDICT_SETS
from benchmark_verdict import Dataset, hide_forces, labelled_pairs, run_datasets

ROOT = Path(__file__).resolve().parents[1]
ARMS = "sf-high-e,mf,mf-low0.1,mf-low0.01,mf-low0.001,mf-low0.0001"
ENDS = ("sf-high-e", "mf")
WITHIN = 1.05

DATASETS = {
    "correlated": Dataset(
        "correlated",
        ROOT / "recipes/correlated_mf.yaml",
        "pyscf:mp2/cc-pvdz",  # the shipped pairs' level (labelled by scripts/make_correlated_data.py)
        ("dtype=float32",),
        ROOT / "demo/correlated/valid_pairs.xyz",
        100,
    ),
    **{k: VERDICT_SETS[k] for k in ("seed", "ethanol", "pyseqm")},
}

log = logging.getLogger("benchmark_crossover")


def bench_inputs(ds: Dataset, args: argparse.Namespace) -> list[str]:
    """The overrides that run ``ds`` without high-level forces in training and validation, with its pairs."""
    from mace_mf.config.loading import load_recipe

    base = load_recipe(ds.recipe, list(ds.budget))
    common = [*ds.budget, "md_check.enabled=false", "num_threads=1"]
    if base.data.valid_pairs is not None:  # shipped with the data, whose validation has no high forces
        return common
    spec = base.fidelities[base.target]
    work = args.out / ds.name
    train = hide_forces(base.data.train, spec.forces_key, work / "data" / "train.xyz")
    valid = hide_forces(base.data.valid, spec.forces_key, work / "data" / "valid.xyz")
    pairs = labelled_pairs(ds, base.data.valid, spec.energy_key, spec.forces_key, ds.pairs, work)
    return [*common, f"data.train={train}", f"data.valid={valid}", f"data.valid_pairs={pairs}"]


def curve(result: dict, arms: list[str], fractions: list[float], bench: Path) -> list[dict]:
    """Per fraction: every arm's test force RMSE (mean ± std over seeds), the pick and how it fares."""
    rows = []
    for f in fractions:
        key = (lambda a: a) if f >= 1.0 else (lambda a, f=f: f"{a}@{f:g}")
        decision = result["decision"] if f >= 1.0 else result["fraction_decisions"][f"{f:g}"]
        summary = {a: result["summary"][key(a)] for a in arms}
        test = {a: summary[a]["test/f_rmse_meV_A"] for a in arms}
        runs = result["runs"][key("sf-high-e")]
        folder = bench / "sf-high-e" / f"seed{runs[0]['seed']}" / ("" if f >= 1.0 else f"frac{f:g}")
        energies = json.loads((folder / "metrics.json").read_text())["train"][result["high"]]["n_e"]
        better_end = min(test[a] for a in ENDS)
        chosen = decision["best"]
        best = min(arms, key=lambda a: test[a])
        rows.append(
            {
                "fraction": f,
                "energies": energies,
                "test_f_rmse": test,
                "test_f_rmse_std": {a: summary[a]["test/f_rmse_meV_A_std"] for a in arms},
                "pairs_estimate": decision.get("values"),
                "chosen": chosen,
                "resolved": decision.get("resolved"),
                "never_loses": test[chosen] <= WITHIN * better_end,
                "chosen_gain_over_better_end": 1.0 - test[chosen] / better_end,
                "best": best,
                "best_gain_over_better_end": 1.0 - test[best] / better_end,
            }
        )
    return rows


def crossover(rows: list[dict]) -> float | None:
    """High-level energies at which energies alone overtake ``mf`` (log-linear between fractions)."""
    diff = [(np.log(r["energies"]), r["test_f_rmse"]["sf-high-e"] - r["test_f_rmse"]["mf"]) for r in rows]
    for (x0, d0), (x1, d1) in itertools.pairwise(diff):
        if d0 > 0 >= d1:
            return float(np.exp(x0 + (x1 - x0) * d0 / (d0 - d1)))
    return None


def plot(name: str, high: str, rows: list[dict], arms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["energies"] for r in rows]
    for arm in arms:
        y = [r["test_f_rmse"][arm] for r in rows]
        err = [r["test_f_rmse_std"][arm] or 0.0 for r in rows]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=arm, lw=2 if arm in ENDS else 1)
    ax.plot(x, [r["test_f_rmse"][r["chosen"]] for r in rows], "k*", ms=12, label="bench's pick (pairs)")
    if (n := crossover(rows)) is not None:
        ax.axvline(n, color="0.5", ls="--", lw=1)
        ax.text(n, ax.get_ylim()[0], f" crossover ≈ {n:.0f}", va="bottom", color="0.3", fontsize=9)
    ax.set_xscale("log")
    ax.set_xticks(x, [str(v) for v in x])
    ax.minorticks_off()
    ax.set_xlabel(f"{high} energies in training")
    ax.set_ylabel(f"{high} test force RMSE (meV/Å)")
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_dataset(ds: Dataset, args: argparse.Namespace) -> dict:
    from mace_mf.workflows.bench import run_benchmark

    if not ds.needs.is_file() or not ds.recipe.is_file():
        return {"skipped": f"{ds.needs} not found"}
    from mace_mf.config.loading import load_recipe

    try:
        load_recipe(ds.recipe, list(ds.budget))
    except Exception as exc:  # e.g. the foundation of ../shared is absent
        return {"skipped": str(exc)}
    arms = [a for a in args.arms.split(",") if a]
    fractions = sorted(float(f) for f in args.fractions.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    bench = args.out / ds.name / "bench"
    common = bench_inputs(ds, args)
    result = run_benchmark(ds.recipe, bench, arms, seeds, fractions, arms, common, workers=args.workers)
    rows = curve(result, arms, fractions, bench)
    plot(ds.name, result["high"], rows, arms, args.out / ds.name / "learning_curve.png")
    return {"high": result["high"], "seeds": seeds, "rows": rows, "crossover_energies": crossover(rows)}


def _percent(change: float) -> str:
    """A relative change as a signed percentage ("0 %" for none: the pick is the better end)."""
    value = round(100 * change)
    return f"{value:+d} %" if value else "0 %"


def markdown(results: dict[str, dict], arms: list[str]) -> str:
    lines = ["# Learning curves across the crossover (scripts/benchmark_crossover.py)", ""]
    for name, r in results.items():
        if "skipped" in r:
            lines += [f"## {name}: skipped ({r['skipped']})", ""]
            continue
        n = r["crossover_energies"]
        where = f"energies alone overtake `mf` at about {n:.0f} {r['high']} energies" if n else "no crossover"
        lines += [
            f"## {name} ({r['high']} test force RMSE, meV/Å, seeds {', '.join(map(str, r['seeds']))}; {where})",
            "",
            "| energies | "
            + " | ".join(f"`{a}`" for a in arms)
            + " | pick (pairs) | never loses | pick vs better end |",
            "|---|" + "---|" * (len(arms) + 3),
        ]
        for row in r["rows"]:
            cells = []
            for a in arms:
                std = row["test_f_rmse_std"][a]
                cells.append(f"{row['test_f_rmse'][a]:.0f}" + (f" ± {std:.0f}" if std else ""))
            lines.append(
                f"| {row['energies']} ({row['fraction']:.0%}) | "
                + " | ".join(cells)
                + f" | `{row['chosen']}`{'' if row['resolved'] else ' (not resolved)'} | "
                + f"{'yes' if row['never_loses'] else 'NO'} | {_percent(-row['chosen_gain_over_better_end'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "crossover")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated of {', '.join(DATASETS)}")
    parser.add_argument(
        "--arms", default=ARMS, help=f"candidate arms (default {ARMS}); must include {' and '.join(ENDS)}"
    )
    parser.add_argument("--fractions", default="0.05,0.2,1", help="fractions of the high-level energies kept")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once")
    args = parser.parse_args()
    args.out = args.out.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    arms = [a for a in args.arms.split(",") if a]
    run_datasets(
        args.datasets,
        lambda name: run_dataset(DATASETS[name], args),
        args.out,
        "crossover",
        lambda r: markdown(r, arms),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
