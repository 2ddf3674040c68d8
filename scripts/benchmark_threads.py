"""The CPU thread default (``num_threads: null``) against fixed counts, on a quiet and a loaded machine.

    python scripts/benchmark_threads.py --out runs/threads                 # ~8 min on 2 cores
    python scripts/benchmark_threads.py --out runs/threads --load 0,2 --threads auto,1,2,4

For each load (that many busy processes at normal priority, started here, each a pure-Python loop)
and each setting, ``mace-mf train recipes/seed_regime.yaml`` runs 3 epochs in a child process;
the median of epochs 1-2 (``history.json``) is its epoch time, and ``run.json`` says which thread
count the default chose. Settings are alternated within a load; results in ``<out>/results.json``
and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUSY = "import time\nwhile True:\n    sum(i * i for i in range(10000))\n"


def run(out: Path, setting: str, epochs: int) -> tuple[float, int]:
    value = "null" if setting == "auto" else setting
    recipe = str(ROOT / "recipes" / "seed_regime.yaml")
    overrides = [f"training.epochs={epochs}", "md_check.enabled=false", f"num_threads={value}"]
    args = ["train", recipe, "--out", str(out), "--overwrite"]
    for override in overrides:
        args += ["--set", override]
    subprocess.run([sys.executable, "-m", "mace_mf.cli", *args], check=True, capture_output=True, cwd=ROOT)
    history = json.loads((out / "history.json").read_text())
    times = [r["epoch_time_s"] for r in history["epochs"][1:]]
    return float(np.median(times)), json.loads((out / "run.json").read_text())["num_threads"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--load", default="0,2", help="busy processes to run alongside, per measurement")
    parser.add_argument("--threads", default="auto,1,2", help="settings of num_threads (auto: null)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    ctx = parser.parse_args()
    ctx.out.mkdir(parents=True, exist_ok=True)
    settings = ctx.threads.split(",")
    results: dict[str, dict[str, dict[str, object]]] = {}
    for load in (int(x) for x in ctx.load.split(",")):
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
        try:
            time.sleep(2 if load else 0)  # the busy processes are runnable before the first run starts
            seen: dict[str, list[float]] = {s: [] for s in settings}
            chosen: dict[str, int] = {}
            for repeat in range(ctx.repeats):
                for setting in settings if repeat % 2 == 0 else settings[::-1]:
                    seconds, threads = run(ctx.out / f"load{load}-{setting}", setting, ctx.epochs)
                    seen[setting].append(seconds)
                    chosen[setting] = threads
            results[f"load {load}"] = {
                s: {"epoch_s": round(float(np.median(v)), 2), "each": [round(x, 2) for x in v], "threads": chosen[s]}
                for s, v in seen.items()
            }
        finally:
            for process in busy:
                process.kill()
        print(json.dumps({f"load {load}": results[f"load {load}"]}, indent=2), flush=True)
    (ctx.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"`{' '.join(sys.argv)}` on {os.cpu_count()} cores",
        "",
        "| load | setting | threads | epoch (s) |",
        "|---|---|---|---|",
    ]
    for load, row in results.items():
        lines += [
            f"| {load} | {s} | {r['threads']} | {r['epoch_s']} ({', '.join(map(str, r['each']))}) |"
            for s, r in row.items()
        ]
    (ctx.out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
