"""What does fine-tuning forget, and what does replay cost and buy? (PM6 -> DFT, SPICE foundation.)

Arms, each ``recipes/pyseqm_mf.yaml`` on a budget (3 epochs, float32, 300 training geometries, one
torch thread per run, two runs at a time):

* ``none``: the recipe as written (no replay; the foundation's elements cut to C, H, N, O);
* ``measured``: ``replay`` with weights 0: nothing is replayed, every element is kept, and the
  held-out replay geometries measure how far plain fine-tuning moved the foundation's level;
* ``replay``: the same replay set trained on at the default weights (E 10, F 100), as large as the
  training set, riding along the fine-tuning batches; ``--arms`` adds ``replay-1-10`` (E 1, F 10) and
  ``replay-shuffled`` (``ride_along: false``: the replay geometries make batches of their own).

The replay set is generated (MD frames of ASE's g2 molecules made of the foundation's elements,
run with the foundation; chosen by farthest-point sampling) and the same in every run. Each run with
replay also runs ``md_check`` (100 NVE steps from 300 K) from 20 held-out replay molecules with the
target head and with the foundation. Per run: the DFT test force and energy RMSE, the drift of the
foundation's level (``forgetting.json``), the MD pass counts and the median epoch time.

    python scripts/benchmark_replay.py --out runs/replay            # ~45 min on 2 cores, resumable

Results: ``<out>/results.json`` and ``<out>/results.md``; finished runs are not rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pyseqm_mf.yaml"
BUDGET = ["training.epochs=3", "dtype=float32", "num_threads=1", "data.max_train=300", "md_check.structures=3"]
REPLAY = ["replay.enabled=true", "replay.budget=375", "replay.md_check=20"]  # 300 trained, 75 held out
ARMS = {
    "none": [],
    "measured": [*REPLAY, "replay.energy_weight=0", "replay.forces_weight=0"],
    "replay-1-10": [*REPLAY, "replay.energy_weight=1.0", "replay.forces_weight=10.0"],
    "replay": REPLAY,  # the default weights, riding along the fine-tuning batches
    "replay-shuffled": [*REPLAY, "replay.ride_along=false"],  # batches of their own, as mace-torch
}


def run(out: Path, arm: str, seed: int, cache: Path) -> Path:
    folder = out / arm / f"seed{seed}"
    record = folder / "run.json"
    if record.is_file() and json.loads(record.read_text()).get("status") == "complete":
        return folder
    overrides = [*BUDGET, *ARMS[arm], f"seed={seed}", f"data.label_cache={cache}"]
    args = [sys.executable, "-m", "mace_mf.cli", "train", str(RECIPE), "--out", str(folder)]
    args += ["--resume"] if record.is_file() else []
    for override in overrides:
        args += ["--set", override]
    with open(out / f"{arm}-seed{seed}.log", "w") as log:
        subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return folder


def scores(folder: Path) -> dict[str, float | None]:
    metrics = json.loads((folder / "metrics.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    test = metrics["test"]["dft"]
    row: dict[str, float | None] = {
        "test_f_rmse": test["f_rmse_meV_A"],
        "test_e_rmse": test["e_rmse_meV_atom"],
        "epoch_s": float(np.median([e["epoch_time_s"] for e in history["epochs"][1:]])),
    }
    forgetting = folder / "forgetting.json"
    if forgetting.is_file():
        record = json.loads(forgetting.read_text())
        row.update(drift_f=record["drift"]["f_rmse_meV_A"], drift_e=record["drift"]["e_rmse_meV_atom"])
        for model, check in (record.get("md_check") or {}).items():
            row[f"md_{model}"] = check["passed"]
            row["md_n"] = check["structures"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--none-seeds", default="0", help="seeds of the arm without replay (time and errors)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arms", default="measured,replay", help=f"arms with replay, of {', '.join(ARMS)}")
    args = parser.parse_args()
    if not (ROOT.parent / "shared" / "data" / "pyseqm_chno").is_dir():
        print("skipped: ../shared/data/pyseqm_chno is absent")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    cache = (args.out / "label-cache").resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    jobs = [(a, s) for s in seeds for a in arms]  # the first run makes the shared replay set once
    jobs += [("none", int(s)) for s in args.none_seeds.split(",") if s]
    run(args.out, *jobs[0], cache)
    with ThreadPoolExecutor(args.workers) as pool:
        folders = list(pool.map(lambda job: (job, run(args.out, *job, cache)), jobs))
    results: dict[str, list[dict[str, float | None]]] = {}
    for (arm, seed), folder in folders:
        results.setdefault(arm, []).append({"seed": seed, **scores(folder)})
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    def mean(arm: str, key: str) -> str:
        values = [r[key] for r in results.get(arm, []) if r.get(key) is not None]
        if not values:
            return "–"
        spread = f" ± {np.std(values):.1f}" if len(values) > 1 else ""
        return f"{np.mean(values):.1f}{spread}"

    lines = [
        f"`{' '.join(sys.argv)}`",
        "",
        "| arm | runs | DFT test F RMSE (meV/Å) | DFT test E RMSE (meV/atom) | drift F (meV/Å) | drift E (meV/atom) "
        "| MD stable: target / foundation | epoch (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, rows in results.items():
        md = "–"
        if rows and rows[0].get("md_n"):
            md = " ".join(f"{r.get('md_target')}/{r.get('md_foundation')} of {r['md_n']}" for r in rows)
        lines.append(
            f"| {arm} | {len(rows)} | {mean(arm, 'test_f_rmse')} | {mean(arm, 'test_e_rmse')} | "
            f"{mean(arm, 'drift_f')} | {mean(arm, 'drift_e')} | {md} | {mean(arm, 'epoch_s')} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
