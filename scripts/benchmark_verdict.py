"""Is `mace-mf bench`'s verdict right when no high-level forces exist?

For each data set, the high level's forces are removed from the training and validation files (the
user's real case), displacement pairs of the validation geometries are labelled with the high
level's energies, and `mace-mf bench` trains the arms and decides on the pairs alone. The decision is
then checked against what it could not see:

* **right**: the arm it picks has the lowest test force RMSE of the candidates, or one within 5 %;
* **estimate**: each arm's pairs estimate against its true validation force RMSE (the exported model
  scored on the original validation file): the ratio, and whether both rank the arms alike;
* **cost**: for 5, 10, 20, ... pairs (random subsets of the labelled ones, 400 draws), how often the
  decision is right and how often the bootstrap calls it resolved.

Data sets (each skipped, with the reason, when its files are absent):

* ``demo``: `recipes/quickstart.yaml` (GFN2-xTB → PBE0/def2-SVP); pairs labelled with
  ``pyscf:pbe0/def2-svp``, the level of the demo's DFT labels;
* ``seed``: `recipes/seed_regime.yaml` (PBE0/def2-TZVP → PBE0/def2-QZVP); pairs with ``pyscf:pbe0/def2-qzvp``;
* ``ethanol``: `recipes/ethanol_mf.yaml` (GFN2-xTB → PBE/def2-SVP, 100 PBE energies; run
  `scripts/make_ethanol_mf.py` first); pairs with ``pyscf:pbe/def2-svp``, which reproduces the
  ORCA labels of ``../shared`` to 0.5 meV/Å;
* ``pyseqm``: `recipes/pyseqm_mf.yaml` (PM6 → DFT, 600 training geometries, 3 epochs, float32). The
  DFT level of these data is not documented (ωB97X/6-31G* is 100-800 meV/Å away from it), so no
  pair can be computed: the pair energies are built from the true DFT forces as E(x) ∓ δF(x)·u, so
  their finite difference is F(x)·u exactly. That checks the sampling of the estimate and the
  decision on it, not the finite difference (which the three other sets check); those files carry
  ``pair_projected: True``.

    python scripts/benchmark_verdict.py --out runs/verdict                  # all four, 40 pairs, seed 0
    python scripts/benchmark_verdict.py --datasets demo,seed --seeds 0,1,2

Results: ``<out>/verdict.json`` and ``<out>/verdict.md``; each set's bench in ``<out>/<set>/bench``.
Everything is resumable: labelled pairs and finished arms are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARMS = "sf-high-e,mf,mf-delta,mf-independent,sf-low"
COST_PAIRS = (5, 10, 20, 40, 100, 200)
DRAWS = 400
WITHIN = 1.05

log = logging.getLogger("benchmark_verdict")


@dataclass(frozen=True)
class Dataset:
    name: str
    recipe: Path
    calculator: str | None  # labels the pairs' high-level energies; None: projected from true forces
    budget: tuple[str, ...]
    needs: Path
    pairs: int  # default number of pairs: enough for the decision; 200 where the estimate is checked to 15 %


DATASETS = {
    "demo": Dataset("demo", ROOT / "recipes/quickstart.yaml", "pyscf:pbe0/def2-svp", (), ROOT / "demo/valid.xyz", 40),
    "seed": Dataset(
        "seed", ROOT / "recipes/seed_regime.yaml", "pyscf:pbe0/def2-qzvp", (), ROOT / "demo/seed_regime/valid.xyz", 40
    ),
    "ethanol": Dataset(
        "ethanol",
        ROOT / "recipes/ethanol_mf.yaml",
        "pyscf:pbe/def2-svp",
        (),
        ROOT / "runs/ethanol_mf_data/valid.xyz",
        200,
    ),
    "pyseqm": Dataset(
        "pyseqm",
        ROOT / "recipes/pyseqm_mf.yaml",
        None,
        ("training.epochs=3", "dtype=float32", "data.max_train=600"),
        ROOT.parent / "shared/data/pyseqm_chno/valid.xyz",
        200,
    ),
}


def hide_forces(source: str | list[str], forces_key: str, target: Path) -> Path:
    """A copy of the data file(s) without the high level's forces (the user's real case)."""
    if target.is_file():
        return target
    frames = [a for path in ([source] if isinstance(source, str) else source) for a in ase.io.read(path, ":")]
    for atoms in frames:
        atoms.arrays.pop(forces_key, None)
        if atoms.calc is not None:
            atoms.calc.results.pop(forces_key, None)
    target.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(target, frames, format="extxyz")
    return target


def make_ethanol_data() -> None:
    """Write the ethanol set's files (scripts/make_ethanol_mf.py) where absent and ../shared has its source."""
    if not DATASETS["ethanol"].needs.is_file() and (ROOT.parent / "shared" / "data" / "botnet_ethanol").is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_ethanol_mf.py")], check=True)


def run_datasets(names: str, run: Callable[[str], dict], out: Path, stem: str, render: Callable[[dict], str]) -> None:
    """Each of the comma-separated data sets in turn (the ethanol files made first where asked for),
    ``<stem>.json`` and ``<stem>.md`` rewritten after each so that a stopped run keeps what finished."""
    if "ethanol" in names:
        make_ethanol_data()
    results: dict[str, dict] = {}
    for name in [n for n in names.split(",") if n]:
        results[name] = run(name)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
        (out / f"{stem}.md").write_text(render(results))
    print((out / f"{stem}.md").read_text())


def labelled_pairs(ds: Dataset, valid: str | list[str], energy_key: str, forces_key: str, n: int, work: Path) -> Path:
    """Displacement pairs of the validation geometries with the high level's energies."""
    from mace_mf.data.pairs import make_pairs
    from mace_mf.files import atomic_write_xyz
    from mace_mf.labels.calculators import parse_calculator_spec
    from mace_mf.labels.labelling import label_file

    target = work / f"pairs{n}.{energy_key}.xyz"
    if target.is_file():
        return target
    frames = [a for path in ([valid] if isinstance(valid, str) else valid) for a in ase.io.read(path, ":")]
    pairs = make_pairs(frames, n, 0.01, seed=0)
    raw = work / f"pairs{n}.xyz"
    if ds.calculator is None:
        for atoms in pairs:
            base = frames[atoms.info["pair_source"]]
            along = float((base.arrays[forces_key] * atoms.arrays["pair_direction"]).sum())
            atoms.info[energy_key] = base.info[energy_key] - atoms.info["pair_sign"] * atoms.info["pair_delta"] * along
            atoms.info["pair_projected"] = True
        atomic_write_xyz(target, pairs)
        return target
    if not raw.is_file():
        atomic_write_xyz(raw, pairs)
    spec = parse_calculator_spec(ds.calculator)
    report = label_file(raw, target, spec, energy_key, None, workers=2, resume=True)
    log.info("%s", report.summary())
    return target


def true_valid_rmse(run: Path, high: str, valid: str | list[str], energy_key: str, forces_key: str) -> float | None:
    """The arm's exported high-level model scored on the original validation forces."""
    from mace_mf.evaluation.inference import evaluate_model_file

    model = run / "models" / f"{high}.model"
    if not model.is_file():
        return None
    files = [valid] if isinstance(valid, str) else list(valid)
    metrics = evaluate_model_file(model, files, [high], energy_key, forces_key, 32)
    return metrics[high]["f_rmse_meV_A"]


def cost_table(folders: dict[str, list[Path]], high: str, truth: dict[str, float]) -> list[dict[str, float]]:
    """For subsets of the pairs: how often the decision is right, and resolved."""
    from mace_mf.evaluation.pairs import paired_preference
    from mace_mf.workflows.bench import RESOLVED, TIE, pair_squared_errors

    squared, weights = {}, None
    for arm, paths in folders.items():
        per_seed = [pair_squared_errors(p, high) for p in paths]
        squared[arm] = np.nanmean(np.stack([s[0] for s in per_seed]), axis=0)
        weights = per_seed[0][1]
    best_true = min(truth.values())
    arms = list(squared)
    table = np.stack([squared[a] for a in arms])
    rng = np.random.default_rng(0)
    rows = []
    for n in COST_PAIRS:
        if n > table.shape[1]:
            continue
        right = resolved = settled = 0
        for _ in range(DRAWS):
            pick = rng.choice(table.shape[1], size=n, replace=False)
            w = weights[pick]
            rmse = np.sqrt((table[:, pick] * w).sum(1) / w.sum())
            order = np.argsort(rmse)
            chosen = arms[order[0]]
            right += truth[chosen] <= WITHIN * best_true
            pref, low, high_ratio = paired_preference(
                table[order[0], pick], table[order[1], pick], w, seed=int(rng.integers(1e9))
            )
            resolved += pref >= RESOLVED
            settled += pref >= RESOLVED or (low >= 1 / TIE and high_ratio <= TIE)
        rows.append(
            {
                "pairs": n,
                "energies": 2 * n,
                "right": right / DRAWS,
                "resolved": resolved / DRAWS,
                "settled": settled / DRAWS,
            }
        )
    return rows


def run_dataset(ds: Dataset, args: argparse.Namespace) -> dict:
    from mace_mf.config.loading import load_recipe
    from mace_mf.workflows.bench import run_benchmark

    if not ds.needs.is_file():
        hint = " (run scripts/make_ethanol_mf.py)" if ds.name == "ethanol" else ""
        return {"skipped": f"{ds.needs} not found{hint}"}
    work = args.out / ds.name
    base = load_recipe(ds.recipe, list(ds.budget))
    high = base.target
    spec = base.fidelities[high]
    train = hide_forces(base.data.train, spec.forces_key, work / "data" / "train.xyz")
    valid = hide_forces(base.data.valid, spec.forces_key, work / "data" / "valid.xyz")
    pairs = labelled_pairs(ds, base.data.valid, spec.energy_key, spec.forces_key, args.pairs or ds.pairs, work)
    common = [*ds.budget, f"data.train={train}", f"data.valid={valid}", f"data.valid_pairs={pairs}"]
    common += ["md_check.enabled=false", "num_threads=1"]
    arms = [a for a in args.arms.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",")]
    result = run_benchmark(ds.recipe, work / "bench", arms, seeds, [1.0], [], common, workers=args.workers)
    summary, decision = result["summary"], result["decision"]
    truth = {a: summary[a]["test/f_rmse_meV_A"] for a in decision["values"]}
    best_true = min(truth, key=truth.get)
    folders = {a: [work / "bench" / a / f"seed{s}" for s in seeds] for a in decision["values"]}
    true_valid = {
        a: float(np.mean([true_valid_rmse(p, high, base.data.valid, spec.energy_key, spec.forces_key) for p in paths]))
        for a, paths in folders.items()
    }
    estimate = {a: decision["values"][a] for a in folders}
    order_pairs = sorted(estimate, key=estimate.get)
    order_true = sorted(true_valid, key=true_valid.get)
    # orderings that the true errors resolve (more than 5 % apart): do the pairs get them right?
    resolved = [(a, b) for a in true_valid for b in true_valid if true_valid[a] * WITHIN < true_valid[b]]
    agree = [(a, b) for a, b in resolved if estimate[a] < estimate[b]]
    return {
        "high": high,
        "pairs": decision.get("n_pairs"),
        "projected": ds.calculator is None,
        "decision": decision,
        "verdict": result["verdict"],
        "test_f_rmse": truth,
        "best_by_test_forces": best_true,
        "right": truth[decision["best"]] <= WITHIN * truth[best_true],
        "pairs_estimate_valid": estimate,
        "true_valid_f_rmse": true_valid,
        "estimate_over_true": {a: estimate[a] / true_valid[a] for a in estimate},
        "ranking_pairs": order_pairs,
        "ranking_true_valid": order_true,
        "same_ranking": order_pairs == order_true,
        "orderings_resolved_by_true": len(resolved),
        "orderings_pairs_agree": len(agree),
        "cost": cost_table(folders, high, truth),
    }


def markdown(results: dict[str, dict]) -> str:
    lines = ["# Verdict without high-level forces (scripts/benchmark_verdict.py)", ""]
    for name, r in results.items():
        if "skipped" in r:
            lines += [f"## {name}: skipped ({r['skipped']})", ""]
            continue
        d = r["decision"]
        state = "resolved" if d["resolved"] else "a tie" if d.get("tie") else "not resolved"
        kind = "pair energies projected from true forces" if r["projected"] else "pair energies computed"
        lines += [
            f"## {name} (high level `{r['high']}`, {r['pairs']} pairs, {kind})",
            "",
            "| arm | pairs estimate, valid (meV/Å) | true valid F RMSE | estimate / true | test F RMSE |",
            "|---|---|---|---|---|",
        ]
        for arm in r["ranking_pairs"]:
            lines.append(
                f"| `{arm}` | {r['pairs_estimate_valid'][arm]:.0f} | {r['true_valid_f_rmse'][arm]:.0f} | "
                f"{r['estimate_over_true'][arm]:.2f} | {r['test_f_rmse'][arm]:.0f} |"
            )
        lines += [
            "",
            f"- decision: `{d['best']}` ({state}, preferred in "
            f"{d['preference']:.0%} of resamples over `{d['runner_up']}`); best by test forces: "
            f"`{r['best_by_test_forces']}`; **{'right' if r['right'] else 'WRONG'}** (within {WITHIN - 1:.0%})",
            f"- ranking by pairs {' < '.join(r['ranking_pairs'])}; by true valid forces "
            f"{' < '.join(r['ranking_true_valid'])} ({'same' if r['same_ranking'] else 'different'}); of the "
            f"{r['orderings_resolved_by_true']} orderings of two arms more than {WITHIN - 1:.0%} apart in true "
            f"valid F RMSE, the pairs get {r['orderings_pairs_agree']} right",
            "- cost: "
            + "; ".join(
                f"{c['pairs']} pairs ({c['energies']} energies): right {c['right']:.0%}, resolved {c['resolved']:.0%}, "
                f"resolved or a tie {c['settled']:.0%}"
                for c in r["cost"]
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "verdict")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated of {', '.join(DATASETS)}")
    parser.add_argument("--arms", default=ARMS, help=f"candidate arms (default {ARMS})")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--pairs", type=int, default=None, help="displacement pairs per data set (2 energies each)")
    parser.add_argument("--workers", type=int, default=2, help="arms trained at once")
    args = parser.parse_args()
    args.out = args.out.resolve()  # recipe overrides name files under it; relative paths would resolve elsewhere
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_datasets(args.datasets, lambda name: run_dataset(DATASETS[name], args), args.out, "verdict", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
