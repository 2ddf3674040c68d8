"""Data at scale: converting to a store, training from it with flat memory, and what caching buys.

    python scripts/benchmark_scale.py --out runs/scale                      # every section (~40 min, 2 cores)
    python scripts/benchmark_scale.py --out runs/scale --sections preprocess,equal
    python scripts/benchmark_scale.py --out runs/scale --large 200000 --sections memory

Sections and the targets they check (results in ``<out>/results.json`` and ``<out>/results.md``):

- ``preprocess``: ``mace-mf preprocess`` of ``--geometries`` (100,000) geometries from one extxyz file
  with 1 and with 2 worker processes: geometries per second per core; 2 workers at least 1.7 x one.
- ``memory``: ``mace-mf train`` for the same number of steps from a ``--small`` (10,000) and a
  ``--large`` (1,000,000) geometry store, graphs built by 2 DataLoader workers: peak memory of the whole
  process tree (the sum of proportional set sizes, sampled every 0.2 s); large at most 1.25 x small.
- ``step``: steady-state epoch time of the same steps, graphs kept in memory (the path every run
  took before stores) against built from the store by 2 workers, alternated; within 10 %.
- ``equal``: a seeded run from a store equals the run with graphs kept in memory (metrics to 1e-9,
  the same E0s).
- ``rerun``: the same recipe on ``--large`` geometries run twice with an empty store cache: time to the
  first training step of the second run (store found by content) at most 10 % of the first's.

Data: synthetic geometries, as the issue allows: the frames of ``--data`` (pyseqm_chno's PM6/DFT
training set) rattled by 0.02 Å with their labels copied, written by a plain extxyz writer here. The
foundation is ``--foundation`` (the SPICE MACE). Generated files and stores are kept in ``<out>`` and
reused by a later invocation. Needs ../shared unless ``--data``/``--foundation``/``--valid`` are given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SECTIONS = ("preprocess", "memory", "step", "equal", "rerun")


# ---- synthetic data ------------------------------------------------------------------------------


def write_synthetic(path: Path, count: int, seed: int, source: Path, keys: tuple[str, str]) -> Path:
    """``count`` frames of ``source`` (cycled), each rattled by 0.02 Å, labels copied; extxyz text."""
    if path.is_file():
        return path
    import ase.io

    frames = ase.io.read(source, ":")
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for i in range(count):
            atoms = frames[i % len(frames)]
            positions = atoms.positions + rng.normal(scale=0.02, size=atoms.positions.shape)
            info = " ".join(f"{k}_energy={float(atoms.info[f'{k}_energy'])!r}" for k in keys)
            forces = ":".join(f"{k}_forces:R:3" for k in keys)
            handle.write(f'{len(atoms)}\nProperties=species:S:1:pos:R:3:{forces} {info} config_id={i} pbc="F F F"\n')
            rows = np.hstack([positions, *(atoms.arrays[f"{k}_forces"] for k in keys)])
            for symbol, row in zip(atoms.get_chemical_symbols(), rows, strict=True):
                handle.write(symbol + " " + " ".join(f"{v:.10f}" for v in row) + "\n")
    tmp.replace(path)
    return path


def synthetic_files(ctx: argparse.Namespace, total: int, per_file: int) -> list[Path]:
    count = -(-total // per_file)
    keys = (ctx.low, ctx.high)
    return [
        write_synthetic(
            ctx.out / f"synthetic-{total}-{k}.xyz", min(per_file, total - k * per_file), 1000 + k, ctx.data, keys
        )
        for k in range(count)
    ]


# ---- measuring a child process tree ------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Peak of Σ PSS over a process and all its descendants (DataLoader workers included), sampled."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak_kib, self.done = pid, interval, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done:
            tree, stack = [], [self.pid]
            while stack:
                pid = stack.pop()
                tree.append(pid)
                stack += _children(pid)
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in tree))
            time.sleep(self.interval)

    def stop(self) -> float:
        self.done = True
        self.thread.join()
        return self.peak_kib / 1024


def run_cli(args: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """``python -m mace_mf.cli ARGS`` as a child: (wall seconds, peak tree memory MiB)."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(
            [sys.executable, "-m", "mace_mf.cli", *args], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
        memory = TreeMemory(child.pid)
        code = child.wait()
        peak = memory.stop()
    if code != 0:
        raise RuntimeError(f"mace-mf {' '.join(args[:1])} failed (exit {code}); see {log}")
    return time.perf_counter() - started, peak


# ---- recipes --------------------------------------------------------------------------------------


def recipe(ctx: argparse.Namespace, folder: Path, train: str | list[str], **changes: Any) -> Path:
    import yaml

    tree: dict[str, Any] = {
        "name": "scale",
        "seed": 0,
        "dtype": ctx.dtype,
        "num_threads": 1,
        "foundation": {"model": str(ctx.foundation)},
        "fidelities": {
            ctx.low: {
                "energy_key": f"{ctx.low}_energy",
                "forces_key": f"{ctx.low}_forces",
                "energy_weight": 1.0,
                "forces_weight": 10.0,
            },
            ctx.high: {
                "energy_key": f"{ctx.high}_energy",
                "forces_key": f"{ctx.high}_forces",
                "energy_weight": 10.0,
                "forces_weight": 0.0,
            },
        },
        "data": {"train": train, "valid": str(ctx.valid), "statistics_sample": 256, "store_cache": str(ctx.cache)},
        "training": {"epochs": 1, "batch_size": 16, "target": ctx.high, "num_workers": ctx.workers},
        "export": {"fidelities": [ctx.high], "multihead": False, "torchscript": False},
        "md_check": {"enabled": False},
        "wandb": {"mode": "disabled"},
    }
    for dotted, value in changes.items():
        node = tree
        *parents, key = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def history(run: Path) -> dict[str, Any]:
    return json.loads((run / "history.json").read_text())


def record(run: Path) -> dict[str, Any]:
    return json.loads((run / "run.json").read_text())


# ---- sections -------------------------------------------------------------------------------------


def section_preprocess(ctx: argparse.Namespace) -> dict[str, Any]:
    """1 and 2 workers alternated ``--repeats`` times (ABBA...): on a shared machine one conversion's
    wall time moves by 20 %, so the ratio is taken within each repeat, then the median."""
    (path,) = synthetic_files(ctx, ctx.geometries, ctx.geometries)
    result: dict[str, Any] = {"geometries": ctx.geometries, "file_mb": round(path.stat().st_size / 2**20, 1)}
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(ctx.repeats):
        for workers in (1, 2) if repeat % 2 == 0 else (2, 1):
            store = ctx.out / f"store-preprocess-{workers}"
            _, peak = run_cli(
                ["preprocess", str(path), "--out", str(store), "--workers", str(workers), "--overwrite"],
                ctx.out / f"preprocess-{workers}.log",
            )
            manifest = json.loads((store / "manifest.json").read_text())
            seconds[workers].append(manifest["seconds"])
            result[f"workers_{workers}"] = {
                "convert_s": seconds[workers],
                "peak_memory_mib": round(peak),
                "store_mb": round(sum(f.stat().st_size for f in store.iterdir()) / 2**20, 1),
            }
    for workers in (1, 2):
        median = float(np.median(seconds[workers]))
        result[f"workers_{workers}"]["geometries_per_s_per_core"] = round(ctx.geometries / median / workers, 1)
    ratios = [a / b for a, b in zip(seconds[1], seconds[2], strict=True)]
    result["speedup_2_over_1"] = {"median": round(float(np.median(ratios)), 3), "each": [round(r, 3) for r in ratios]}
    result["target_met"] = result["speedup_2_over_1"]["median"] >= 1.7
    return result


def _store(ctx: argparse.Namespace, total: int) -> Path:
    store = ctx.out / f"store-{total}"
    if not (store / "manifest.json").is_file():
        files = synthetic_files(ctx, total, min(total, 100_000))
        args = ["preprocess", *map(str, files), "--out", str(store), "--workers", str(ctx.workers)]
        run_cli(args, ctx.out / f"preprocess-store-{total}.log")
    return store


def section_memory(ctx: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"steps": ctx.steps, "workers": ctx.workers}
    for name, total in (("small", ctx.small), ("large", ctx.large)):
        store = _store(ctx, total)
        folder = ctx.out / f"memory-{name}"
        path = recipe(ctx, folder, str(store), training__steps_per_epoch=ctx.steps, data__keep_graphs=False)
        wall, peak = run_cli(["train", str(path), "--out", str(folder / "run"), "--overwrite"], folder / "train.log")
        result[name] = {
            "geometries": total,
            "peak_memory_mib": round(peak),
            "wall_s": round(wall, 1),
            "setup_s": record(folder / "run")["setup_s"],
            "steps": history(folder / "run")["epochs"][0]["steps"],
        }
    result["ratio_large_over_small"] = round(result["large"]["peak_memory_mib"] / result["small"]["peak_memory_mib"], 3)
    result["target_met"] = result["ratio_large_over_small"] <= 1.25
    return result


def section_step(ctx: argparse.Namespace) -> dict[str, Any]:
    store = _store(ctx, ctx.small)
    arms = {
        "kept": {"train": str(ctx.data), "data__keep_graphs": True, "training__num_workers": 0},
        "store": {"train": str(store), "data__keep_graphs": False, "training__num_workers": ctx.workers},
    }
    epochs: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(ctx.repeats):
        for name in list(arms) if repeat % 2 == 0 else list(arms)[::-1]:
            arm = dict(arms[name])
            folder = ctx.out / f"step-{name}-{repeat}"
            train = arm.pop("train")
            path = recipe(
                ctx,
                folder,
                train,
                training__epochs=4,
                training__steps_per_epoch=ctx.step_steps,
                data__max_train=2048,
                **arm,
            )
            run_cli(["train", str(path), "--out", str(folder / "run"), "--overwrite"], folder / "train.log")
            epochs[name] += [r["epoch_time_s"] for r in history(folder / "run")["epochs"][1:]]  # epoch 0 warms up
    medians = {name: float(np.median(times)) for name, times in epochs.items()}
    ratio = medians["store"] / medians["kept"]
    return {
        "steps_per_epoch": ctx.step_steps,
        "epoch_s": {name: [round(t, 2) for t in times] for name, times in epochs.items()},
        "median_epoch_s": {name: round(t, 2) for name, t in medians.items()},
        "step_ms": {name: round(1000 * t / ctx.step_steps, 1) for name, t in medians.items()},
        "ratio_store_over_kept": round(ratio, 3),
        "target_met": ratio <= 1.10,
    }


def section_equal(ctx: argparse.Namespace) -> dict[str, Any]:
    runs = {}
    for name, changes in (
        ("kept", {"data__keep_graphs": True, "training__num_workers": 0}),
        ("store", {"data__keep_graphs": False, "training__num_workers": ctx.workers}),
    ):
        folder = ctx.out / f"equal-{name}"
        path = recipe(ctx, folder, str(ctx.data), dtype="float64", data__max_train=256, **changes)
        run_cli(["train", str(path), "--out", str(folder / "run"), "--overwrite"], folder / "train.log")
        runs[name] = folder / "run"
    a, b = (json.loads((runs[n] / "metrics.json").read_text()) for n in ("kept", "store"))
    worst = max(
        abs(a[s][f][k] - b[s][f][k]) / max(abs(a[s][f][k]), 1e-12)
        for s in a
        for f in a[s]
        for k in a[s][f]
        if isinstance(a[s][f][k], float)
    )
    e0 = [
        [
            line
            for line in (runs[n] / "report.md").read_text().splitlines()
            if line.startswith((f"| {ctx.low} |", f"| {ctx.high} |"))
        ]
        for n in ("kept", "store")
    ]
    return {
        "max_relative_metric_difference": worst,
        "same_e0s": e0[0] == e0[1],
        "target_met": worst <= 1e-9 and e0[0] == e0[1],
    }


def section_rerun(ctx: argparse.Namespace) -> dict[str, Any]:
    files = synthetic_files(ctx, ctx.large, min(ctx.large, 100_000))
    cache = ctx.out / "rerun-cache"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    result: dict[str, Any] = {"geometries": ctx.large, "files": len(files)}
    for attempt in ("first", "second"):
        folder = ctx.out / f"rerun-{attempt}"
        path = recipe(
            ctx,
            folder,
            [str(f) for f in files],
            data__store_cache=str(cache),
            data__preprocess_workers=ctx.workers,
            training__steps_per_epoch=5,
        )
        wall, _ = run_cli(["train", str(path), "--out", str(folder / "run"), "--overwrite"], folder / "train.log")
        result[attempt] = {"setup_s": record(folder / "run")["setup_s"], "wall_s": round(wall, 1)}
    result["ratio_second_over_first"] = round(result["second"]["setup_s"] / result["first"]["setup_s"], 3)
    result["target_met"] = result["ratio_second_over_first"] <= 0.10
    return result


def markdown(results: dict[str, Any], ctx: argparse.Namespace) -> str:
    lines = [
        "# Data at scale",
        "",
        f"`{' '.join(sys.argv)}`; {ctx.dtype}, batch 16, one torch thread, {ctx.workers} workers; foundation "
        f"`{ctx.foundation.name}`; load average before {results['load_before']}, after {results['load_after']}.",
        "",
    ]
    for name, section in results["sections"].items():
        lines += [f"## {name}", "", "```json", json.dumps(section, indent=2), "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "pyseqm_chno" / "train.xyz")
    parser.add_argument("--valid", type=Path, default=SHARED / "data" / "pyseqm_chno" / "valid.xyz")
    parser.add_argument("--foundation", type=Path, default=SHARED / "models" / "spice_small_2022.model")
    parser.add_argument("--geometries", type=int, default=100_000, help="preprocess section")
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=200, help="training steps of the memory runs")
    parser.add_argument("--step-steps", type=int, default=30, help="steps per timed epoch (step section)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats (preprocess and step sections)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--low", default="pm6", help="low fidelity: <low>_energy and <low>_forces in --data")
    parser.add_argument("--high", default="dft", help="high fidelity (target): <high>_energy, <high>_forces")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ctx = parser.parse_args()
    for path in (ctx.data, ctx.valid, ctx.foundation):
        if not path.exists():
            print(f"{path} is not here (the benchmark needs ../shared, or --data/--valid/--foundation); nothing run")
            return 0
    ctx.out = ctx.out.resolve()
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.cache = ctx.out / "store-cache"
    results: dict[str, Any] = {"load_before": round(os.getloadavg()[0], 2), "sections": {}}
    chosen = [s for s in ctx.sections.split(",") if s]
    for name in chosen:
        if name not in SECTIONS:
            parser.error(f"--sections: {name!r} is not one of {', '.join(SECTIONS)}")
    started = time.perf_counter()
    for name in chosen:
        print(f"section {name}", flush=True)
        results["sections"][name] = globals()[f"section_{name}"](ctx)
        print(json.dumps(results["sections"][name], indent=2), flush=True)
    results["load_after"] = round(os.getloadavg()[0], 2)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    (ctx.out / "results.json").write_text(json.dumps(results, indent=2))
    (ctx.out / "results.md").write_text(markdown(results, ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
