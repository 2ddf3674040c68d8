"""Speed of mace_mf training and of its exported files, in one invocation.

    python scripts/benchmark_speed.py --out runs/speed                 # every section on ../shared
    python scripts/benchmark_speed.py --out runs/speed --subset 128 --repeats 3 --sections 1
    python scripts/benchmark_speed.py --out runs/speed-demo --foundation demo/foundation.model \\
        --data demo/train.xyz --low xtb --high dft --subset 32 --repeats 2 --molecules 8

Sections (``--sections``, comma-separated; each is an independent function in ``SECTIONS``):

1. fidelity overhead: wall and CPU time of one training epoch through the real ``Trainer.train_epoch`` with
   two fidelities (low E+F, high E; the recipe's coupling, ``tied`` by default) vs one (high E+F), on the same
   geometries, foundation, batch size and dtype;
2. against upstream: ``mace-mf train`` vs mace-torch's ``mace_run_train`` (``mace_mf.workflows.upstream``, one head per
   fidelity, the same recipe, geometries, labels, batch size, dtype, EMA and epochs), each a child
   process, alternating; epoch time after the first epoch (training + validation of every head, from
   each tool's own log) and the first epoch including set-up;
3. data pipeline: read + graph building, time to the first batch, and the share of a steady-state
   epoch spent inside the loader (collation), measured in the same real epochs;
4. inference: the exported single-fidelity ``<high>.model`` (``mace_mf.model.export``) in stock
   ``MACECalculator`` vs the original foundation on the same molecules, and the peak RSS of a
   ``mace-mf train`` child process.

The machine is shared and noisy, so every timing is repeated, the arms alternate within a repeat
(their order flips every repeat), and the results are medians with their min–max spread; ratios are
taken within each repeat (back to back, under similar load), then their median. Targets are judged
on CPU time (``time.process_time``), which the other users of a shared machine disturb far less than
wall time; both are reported. ``results.json`` and ``results.md`` go to ``--out``. Labels are read as
``<fidelity>_energy`` / ``<fidelity>_forces``; the default data and foundation are in ../shared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_FOUNDATION = SHARED / "models" / "spice_small_2022.model"
DEFAULT_DATA = SHARED / "data" / "pyseqm_chno" / "train.xyz"

log = logging.getLogger("benchmark_speed")


@dataclass
class Context:
    """Everything a section needs: the options, and where to write scratch files."""

    foundation: Path
    data: Path
    low: str
    high: str
    subset: int
    repeats: int
    batch_size: int
    dtype: str
    threads: int
    molecules: int
    scratch: Path
    profile: bool
    out: Path
    rss: bool = True
    device: str = "cpu"
    upstream_epochs: int = 3
    upstream_repeats: int = 2
    epochs: tuple[dict[str, Built], dict[str, dict[str, Any]]] | None = None


# -- statistics ----------------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, Any]:
    """Median and spread of repeated timings (the median is what the tables compare)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def spread(s: dict[str, Any], unit: str = "s", digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} {unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, n={s['n']})"


def paired(numerator: list[float], denominator: list[float]) -> dict[str, Any]:
    """Ratios of the two arms' timings within each repeat (run back to back, under similar load),
    with their median, next to the ratio of the medians."""
    per_repeat = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        **summary(per_repeat),
        "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator),
    }


def verdict(cpu: dict[str, Any], wall: dict[str, Any], target: float) -> str:
    return (
        f"CPU time **{cpu['median']:.3f}** (per repeat {cpu['min']:.3f}–{cpu['max']:.3f}), "
        f"wall **{wall['median']:.3f}** (per repeat {wall['min']:.3f}–{wall['max']:.3f}; ratio of medians "
        f"{wall['ratio_of_medians']:.3f}); target ≤ {target}: {'met' if cpu['median'] <= target else 'MISSED'} "
        "(judged on CPU time: on this shared machine wall time mostly measures the other processes)"
    )


def alternating(repeats: int, arms: list[str]) -> Iterator[str]:
    """Arms in turn, the order flipped every repeat (ABBA...), so a drift in machine load hits all."""
    for r in range(repeats):
        yield from (arms if r % 2 == 0 else arms[::-1])


# -- building runs through mace_mf's own code ----------------------------------------------------
def fidelity_recipe(ctx: Context, arm: str) -> dict[str, Any]:
    """The recipe tree of one arm: ``two`` (low E+F, high E) or ``one`` (high E+F)."""
    high_ef = {
        "energy_key": f"{ctx.high}_energy",
        "forces_key": f"{ctx.high}_forces",
        "energy_weight": 1.0,
        "forces_weight": 10.0,
    }
    fidelities = (
        {
            ctx.low: {
                "energy_key": f"{ctx.low}_energy",
                "forces_key": f"{ctx.low}_forces",
                "energy_weight": 1.0,
                "forces_weight": 10.0,
            },
            ctx.high: {"energy_key": f"{ctx.high}_energy", "forces_key": None, "energy_weight": 10.0},
        }
        if arm == "two"
        else {ctx.high: high_ef}
    )
    return {
        "name": f"speed-{arm}",
        "seed": 0,
        "dtype": ctx.dtype,
        "device": ctx.device,
        "num_threads": ctx.threads,
        "foundation": {"model": str(ctx.foundation)},
        "fidelities": fidelities,
        "data": {"train": str(ctx.data), "valid_fraction": 0.05, "max_train": ctx.subset},
        "training": {"epochs": 1, "batch_size": ctx.batch_size, "target": ctx.high},
        "export": {"fidelities": [ctx.high], "multihead": False, "torchscript": False},
        "md_check": {"enabled": False},
        "wandb": {"mode": "disabled"},
    }


@dataclass
class Built:
    """A model ready to train, as ``mace_mf.workflows.run`` builds it, with the set-up times."""

    trainer: Any
    model: Any
    splits: Any
    seconds: dict[str, float]


def build(ctx: Context, arm: str, name: str) -> Built:
    """Foundation → data → heads (+E0s) → Trainer, timing each step (the real run's functions)."""
    import torch

    from mace_mf.config.loading import recipe_from_dict
    from mace_mf.model.build import build_model, torch_dtype
    from mace_mf.model.foundation import load_foundation
    from mace_mf.train.trainer import Trainer
    from mace_mf.workflows.prepare import assign_e0s, start_head

    recipe = recipe_from_dict(fidelity_recipe(ctx, arm), "benchmark_speed", ROOT)
    dtype = torch_dtype(recipe.dtype)
    device = torch.device(recipe.device)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    foundation, info = load_foundation(recipe.foundation.model, recipe.foundation.head, dtype)
    seconds["foundation_load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    single, info, splits = start_head(recipe, foundation, info, dtype)
    seconds["read_and_graphs_s"] = time.perf_counter() - start
    seconds["configs_read"] = len(splits.train) + len(splits.valid)
    start = time.perf_counter()
    model = build_model(single, recipe).to(device)
    assign_e0s(model, single, recipe, splits.train, device)
    seconds["heads_and_e0s_s"] = time.perf_counter() - start
    trainer = Trainer(model, recipe, splits.train, splits.valid, device, ctx.scratch / name / "checkpoints")
    return Built(trainer, model, splits, seconds)


class TimedLoader:
    """The Trainer's own loader, with the time spent producing each batch (collation) summed up."""

    def __init__(self, inner: Any, clock: dict[str, float]) -> None:
        self.inner, self.clock = inner, clock

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # the Trainer reseeds the loader's batch_sampler
        return getattr(self.inner, name)

    def __iter__(self) -> Iterator[Any]:
        start = time.perf_counter()
        iterator = iter(self.inner)
        first = True
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                self.clock["load_s"] += time.perf_counter() - start
                return
            elapsed = time.perf_counter() - start
            self.clock["load_s"] += elapsed
            if first:
                self.clock["first_batch_s"] = elapsed
                first = False
            yield batch
            start = time.perf_counter()


def time_loading(trainer: Any) -> dict[str, float]:
    """Time the loader of the trainer's training split (whatever the Trainer passes it); the clock."""
    clock = {"load_s": 0.0, "first_batch_s": 0.0}
    split = trainer.train
    untimed = split.loader
    split.loader = lambda *args, **kwargs: TimedLoader(untimed(*args, **kwargs), clock)
    return clock


def run_epochs(ctx: Context, arms: dict[str, Built]) -> dict[str, dict[str, Any]]:
    """One warm-up epoch per arm, then ``repeats`` alternating timed epochs."""
    clocks = {name: time_loading(b.trainer) for name, b in arms.items()}
    result: dict[str, dict[str, Any]] = {
        name: {"epoch_s": [], "epoch_cpu_s": [], "load_s": [], "first_batch_s": []} for name in arms
    }
    epoch = {name: 0 for name in arms}
    for name, built in arms.items():
        start = time.perf_counter()
        built.trainer.train_epoch(epoch[name], None)
        result[name]["first_epoch_s"] = time.perf_counter() - start
        epoch[name] += 1
    for name in alternating(ctx.repeats, list(arms)):
        clock = clocks[name]
        clock["load_s"] = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        arms[name].trainer.train_epoch(epoch[name], None)
        result[name]["epoch_s"].append(time.perf_counter() - start)
        result[name]["epoch_cpu_s"].append(time.process_time() - cpu)
        result[name]["load_s"].append(clock["load_s"])
        result[name]["first_batch_s"].append(clock["first_batch_s"])
        epoch[name] += 1
        log.info("%s epoch %.2f s (loading %.3f s)", name, result[name]["epoch_s"][-1], clock["load_s"])
    return result


def profile_epoch(ctx: Context, name: str, built: Built) -> str:
    """torch.profiler table of one epoch (the ops that own the time), written to --out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        built.trainer.train_epoch(10_000, None)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    path = ctx.out / f"profile_{name}.txt"
    path.write_text(table)
    return str(path)


def epochs_of_both(ctx: Context) -> tuple[dict[str, Built], dict[str, dict[str, Any]]]:
    """The alternating epochs that sections 1 and 3 both read (measured once per invocation)."""
    if ctx.epochs is None:
        arms = {
            "one fidelity (high E+F)": build(ctx, "one", "one"),
            "two fidelities (low E+F, high E)": build(ctx, "two", "two"),
        }
        ctx.epochs = (arms, run_epochs(ctx, arms))
    return ctx.epochs


# -- sections ------------------------------------------------------------------------------------
def section_fidelity_overhead(ctx: Context) -> dict[str, Any]:
    """1. Two-fidelity vs one-fidelity epoch on the same geometries (target ratio ≤ 1.15)."""
    arms, timings = epochs_of_both(ctx)
    one, two = list(arms)
    rows = []
    for name in arms:
        t = timings[name]
        rows.append(
            [name, spread(summary(t["epoch_s"])), spread(summary(t["epoch_cpu_s"])), f"{t['first_epoch_s']:.2f} s"]
        )
    wall = paired(timings[two]["epoch_s"], timings[one]["epoch_s"])
    cpu = paired(timings[two]["epoch_cpu_s"], timings[one]["epoch_cpu_s"])
    result: dict[str, Any] = {
        "title": "1. Fidelity overhead (epoch time, Trainer.train_epoch)",
        "header": ["arm", "epoch wall: median (min–max, n)", "epoch CPU time", "first epoch (wall)"],
        "rows": rows,
        "epochs": {name: summary(timings[name]["epoch_s"]) for name in arms},
        "epochs_cpu": {name: summary(timings[name]["epoch_cpu_s"]) for name in arms},
        "wall_ratio_two_over_one": wall,
        "cpu_ratio_two_over_one": cpu,
        "target": "≤ 1.15",
        "met": cpu["median"] <= 1.15,
        "lines": [
            "two/one epoch-time ratio, median over repeats: " + verdict(cpu, wall, 1.15),
            f"{len(arms[one].splits.train)} training geometries (seeded subset), batch size {ctx.batch_size}, "
            f"{ctx.dtype}, {ctx.threads} thread(s); one warm-up epoch per arm, then {ctx.repeats} alternating repeats.",
        ],
    }
    if ctx.profile:
        result["profiles"] = [
            profile_epoch(ctx, arm, arms[name]) for arm, name in zip(("one", "two"), arms, strict=True)
        ]
    return result


MACE_MF_EPOCH_LINE = re.compile(r"^(\S+ \S+) INFO mace_mf\.train\.trainer: epoch (\d+) ")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_mace_mf(ctx: Context, recipe_tree: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``mace-mf train`` in a child process; epoch ends from the timestamps of its own ``train.log``."""
    import yaml

    folder.mkdir(parents=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_tree))
    env = dict(os.environ, OMP_NUM_THREADS=str(ctx.threads), MKL_NUM_THREADS=str(ctx.threads))
    started_at, start, cpu = datetime.now(), time.perf_counter(), children_cpu_s()
    with open(folder / "child.log", "w") as log_file:
        code = subprocess.call(
            [sys.executable, "-m", "mace_mf.cli", "train", str(recipe), "--out", str(folder / "run")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    wall, cpu = time.perf_counter() - start, children_cpu_s() - cpu
    if code != 0:
        raise RuntimeError(f"mace-mf train failed (exit {code}); see {folder / 'child.log'}")
    stamps = [
        datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        for line in (folder / "run" / "train.log").read_text().splitlines()
        if (m := MACE_MF_EPOCH_LINE.match(line))
    ]
    return {
        "first_epoch_s": (stamps[0] - started_at).total_seconds(),
        "epoch_s": [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)],
        "wall_s": wall,
        "cpu_s": cpu,
    }


def timed_upstream(ctx: Context, recipe: Any, folder: Path) -> dict[str, Any]:
    """``mace_run_train`` through ``mace_mf.upstream.run_upstream`` (its epoch times come from its log)."""
    from mace_mf.workflows.upstream import run_upstream

    cpu = children_cpu_s()
    run = run_upstream(recipe, folder, epochs=ctx.upstream_epochs)
    return {
        "first_epoch_s": run.first_epoch_s,
        "epoch_s": run.epoch_s[1:],
        "wall_s": run.wall_s,
        "cpu_s": children_cpu_s() - cpu,
        "command": " ".join(run.command),
    }


def section_against_upstream(ctx: Context) -> dict[str, Any]:
    """2. mace_mf vs upstream multi-head fine-tuning on the same work (target epoch ratio ≤ 0.6)."""
    from mace_mf.config.loading import recipe_from_dict

    tree = fidelity_recipe(ctx, "two")
    tree["training"]["epochs"] = ctx.upstream_epochs
    tree["export"] = {"fidelities": [ctx.high], "multihead": False, "torchscript": False}
    recipe = recipe_from_dict(tree, "benchmark_speed", ROOT)
    tools = {"mace_mf": "mace-mf train", "upstream": "mace_run_train (multi-head)"}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in tools}
    for i, name in enumerate(alternating(ctx.upstream_repeats, list(tools))):
        folder = ctx.scratch / "upstream-section" / f"{i}-{name}"
        runs[name].append(
            timed_mace_mf(ctx, tree, folder) if name == "mace_mf" else timed_upstream(ctx, recipe, folder)
        )
        log.info("%s: epochs %s s", name, ", ".join(f"{t:.1f}" for t in runs[name][-1]["epoch_s"]))
    epoch = {name: [statistics.median(r["epoch_s"]) for r in rs] for name, rs in runs.items()}
    first = {name: [r["first_epoch_s"] for r in rs] for name, rs in runs.items()}
    cpu = {name: [r["cpu_s"] for r in rs] for name, rs in runs.items()}
    ratio = paired(epoch["mace_mf"], epoch["upstream"])
    first_ratio = paired(first["mace_mf"], first["upstream"])
    cpu_ratio = paired(cpu["mace_mf"], cpu["upstream"])
    rows = [
        [
            label,
            spread(summary(epoch[name])),
            spread(summary(first[name])),
            spread(summary([r["wall_s"] for r in runs[name]])),
            spread(summary(cpu[name])),
        ]
        for name, label in tools.items()
    ]
    return {
        "title": "2. Against upstream mace_run_train (same recipe, data and epochs)",
        "header": ["tool", "epoch after the first (wall)", "first epoch incl. set-up", "whole process", "process CPU"],
        "rows": rows,
        "runs": runs,
        "epoch_ratio_mace_mf_over_upstream": ratio,
        "first_epoch_ratio": first_ratio,
        "process_cpu_ratio": cpu_ratio,
        "target": "≤ 0.6",
        "met": ratio["median"] <= 0.6,
        "lines": [
            f"epoch time, mace_mf / upstream, median over repeats: **{ratio['median']:.3f}** "
            f"(per repeat {ratio['min']:.3f}–{ratio['max']:.3f}); target ≤ 0.6: "
            f"{'met' if ratio['median'] <= 0.6 else 'MISSED'}",
            f"first epoch including set-up, mace_mf / upstream: {first_ratio['median']:.3f}; whole-process CPU "
            f"time: {cpu_ratio['median']:.3f} (mace_mf's also holds its zero-shot and final evaluation of "
            "every split, and the export; upstream's final evaluation is skipped)",
            f"{ctx.subset} training geometries (seeded subset) with {ctx.low} E+F and {ctx.high} E, batch size "
            f"{ctx.batch_size}, {ctx.dtype}, {ctx.threads} thread(s), {ctx.upstream_epochs} epochs, "
            f"{ctx.upstream_repeats} alternating repeats. An epoch is training plus validation of every head, "
            "measured between the epoch lines of each tool's own log; upstream sees each geometry once per "
            "head (one data set per head), mace_mf once for all heads.",
            f"upstream command: `{runs['upstream'][0]['command']}`",
        ],
    }


def section_data_pipeline(ctx: Context) -> dict[str, Any]:
    """3. Read + graphs, time to the first batch, loader share of a steady-state epoch (≤ 10 %)."""
    arms, timings = epochs_of_both(ctx)
    rows = []
    shares: dict[str, float] = {}
    for name, built in arms.items():
        t = timings[name]
        share = [load / epoch for load, epoch in zip(t["load_s"], t["epoch_s"], strict=True)]
        shares[name] = statistics.median(share)
        s = built.seconds
        rows.append(
            [
                name,
                f"{s['foundation_load_s']:.2f} s",
                f"{s['read_and_graphs_s']:.2f} s",
                f"{s['heads_and_e0s_s']:.2f} s",
                f"{1000 * statistics.median(t['first_batch_s']):.1f} ms",
                f"{100 * shares[name]:.2f} % ({100 * min(share):.2f}–{100 * max(share):.2f})",
            ]
        )
    worst = max(shares.values())
    return {
        "title": "3. Data pipeline",
        "header": [
            "arm",
            "foundation load",
            "read + graphs",
            "heads + E0 fit",
            "first batch (loader)",
            "loader share of epoch",
        ],
        "rows": rows,
        "set_up": {name: b.seconds for name, b in arms.items()},
        "loader_share": {
            name: summary([lo / ep for lo, ep in zip(timings[name]["load_s"], timings[name]["epoch_s"], strict=True)])
            for name in arms
        },
        "target": "≤ 10 %",
        "met": worst <= 0.10,
        "lines": [
            f"largest loader share: **{100 * worst:.2f} %** of a steady-state epoch; target ≤ 10 %: "
            f"{'met' if worst <= 0.10 else 'MISSED'}",
            "Time to the first training step = foundation load + read + graphs + heads/E0 fit + first batch. "
            f"read + graphs: the whole of {ctx.data.name} is read and checked, graphs are built for the training "
            f"subset and the validation split ({arms[next(iter(arms))].seconds['configs_read']:.0f} configurations), "
            "once per run.",
        ],
    }


def calculators_per_second(ctx: Context, paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Energies + forces per second of stock MACECalculator, alternating between the files."""
    import ase.io
    from mace.calculators import MACECalculator

    frames = ase.io.read(ctx.data, index=f":{ctx.molecules}")
    calcs = {
        name: MACECalculator(model_paths=str(p), device=ctx.device, default_dtype=ctx.dtype)
        for name, p in paths.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for name in paths:  # warm-up (first call builds caches)
        for atoms in frames[:2]:
            a = atoms.copy()
            a.calc = calcs[name]
            a.get_forces()
    for name in alternating(ctx.repeats, list(paths)):
        copies = [a.copy() for a in frames]
        start, cpu_start = time.perf_counter(), time.process_time()
        for atoms in copies:
            atoms.calc = calcs[name]
            atoms.get_potential_energy()
            atoms.get_forces()
        rates[name].append(len(copies) / (time.perf_counter() - start))
        cpu[name].append(1000 * (time.process_time() - cpu_start) / len(copies))
    return {name: {**summary(r), "cpu_ms_per_molecule": summary(cpu[name])} for name, r in rates.items()}


# Run in the child: the CLI, then its own high-water mark. (The rusage that wait4 reports for a child
# is no use here: Linux carries the forking parent's peak over fork and exec into the child's maxrss.)
RSS_CHILD = """
import json, resource, sys
from pathlib import Path
from mace_mf.cli import main
try:
    code = main(sys.argv[2:])
finally:
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    hwm = [int(line.split()[1]) for line in lines if line.startswith("VmHWM:")]
    kib = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(sys.argv[1]).write_text(json.dumps({"peak_rss_KiB": kib, "source": "VmHWM" if hwm else "ru_maxrss"}))
sys.exit(code)
"""


def peak_rss_of_training(ctx: Context) -> dict[str, Any]:
    """``mace-mf train`` (two fidelities, the subset, 1 epoch) in a child process; its peak RSS."""
    import yaml

    folder = ctx.scratch / "rss"
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(fidelity_recipe(ctx, "two")))
    report = folder / "rss.json"
    args = ["train", str(recipe), "--out", str(folder / "run")]
    start = time.perf_counter()
    with open(folder / "child.log", "w") as log_file:
        code = subprocess.call(
            [sys.executable, "-c", RSS_CHILD, str(report), *args], stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT
        )
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"mace-mf train child failed (exit {code}); see {folder / 'child.log'}")
    peak = json.loads(report.read_text())
    return {
        "peak_rss_MiB": peak["peak_rss_KiB"] / 1024,
        "source": peak["source"],
        "wall_s": wall,
        "command": "mace-mf " + " ".join(args),
    }


def section_inference(ctx: Context) -> dict[str, Any]:
    """4. Exported high-fidelity file vs the foundation in stock MACECalculator (target ≤ 1.05)."""
    import torch

    from mace_mf.model.export import export_models

    built = build(ctx, "two", "export")
    built.trainer.train_epoch(0, None)  # trained weights, not the foundation's
    files = export_models(built.model, [ctx.high], ctx.scratch / "models", multihead=False, torchscript=False)
    exported = files[0]
    del built
    torch.set_num_threads(ctx.threads)
    rates = calculators_per_second(ctx, {f"exported {exported.name}": exported, "foundation": ctx.foundation})
    exported_name, foundation_name = list(rates)
    # Time per molecule, exported / foundation (≤ 1.05: at most 5 % slower).
    wall = paired(rates[foundation_name]["values"], rates[exported_name]["values"])
    cpu = paired(
        rates[exported_name]["cpu_ms_per_molecule"]["values"], rates[foundation_name]["cpu_ms_per_molecule"]["values"]
    )
    rss = peak_rss_of_training(ctx) if ctx.rss else None
    rows = [[name, spread(r, "molecules/s", 1), spread(r["cpu_ms_per_molecule"], "ms", 1)] for name, r in rates.items()]
    return {
        "title": "4. Inference (stock MACECalculator, energy + forces)",
        "header": ["model", "energy+forces per second: median (min–max, n)", "CPU time per molecule"],
        "rows": rows,
        "rates": rates,
        "wall_ratio_exported_over_foundation": wall,
        "cpu_ratio_exported_over_foundation": cpu,
        "target": "≤ 1.05",
        "met": cpu["median"] <= 1.05,
        "peak_rss": rss,
        "lines": [
            "time per molecule, exported / foundation, median over repeats: " + verdict(cpu, wall, 1.05),
            f"{ctx.molecules} molecules of {ctx.data.name}, one at a time, {ctx.dtype}; the exported file is the "
            f"`{ctx.high}` head (coupled to `{ctx.low}`, exported as one stock readout) after one epoch.",
            f"peak RSS of training: **{rss['peak_rss_MiB']:.0f} MiB** (`mace-mf train`, two fidelities, "
            f"{ctx.subset} geometries, 1 epoch, eval and export included; {rss['wall_s']:.0f} s wall)"
            if rss is not None
            else "peak RSS of training: not measured (--no-rss)",
        ],
    }


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "1": section_fidelity_overhead,
    "2": section_against_upstream,
    "3": section_data_pipeline,
    "4": section_inference,
}


# -- output --------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mace-torch": version("mace-torch"),
        "e3nn": version("e3nn"),
        "mace-mf": version("mace-mf"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    gpu = f"; GPU {m['gpu']}" if m["gpu"] else ""
    lines = [
        "# mace_mf speed benchmark",
        "",
        f"`{results['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores{gpu}; load average before {m['load_average'][0]:.2f}, "
        f"after {results['load_average_after'][0]:.2f}. Python {m['python']}, torch {m['torch']}, "
        f"mace-torch {m['mace-torch']}, e3nn {m['e3nn']}, mace-mf {m['mace-mf']}. "
        f"Wall time {results['wall_s']:.0f} s.",
        "",
    ]
    for key, section in results["sections"].items():
        lines += [f"## {section.get('title', key)}", ""]
        if "skipped" in section:
            lines += [f"skipped: {section['skipped']}", ""]
            continue
        lines += ["| " + " | ".join(section["header"]) + " |", "|" + "---|" * len(section["header"])]
        lines += ["| " + " | ".join(row) + " |" for row in section["rows"]]
        lines += [""] + [f"- {line}" for line in section["lines"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated of {', '.join(SECTIONS)}")
    parser.add_argument("--foundation", type=Path, default=DEFAULT_FOUNDATION)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="extxyz with <low>/<high>_energy/_forces")
    parser.add_argument("--low", default="pm6", help="low fidelity name (labels <low>_energy, <low>_forces)")
    parser.add_argument("--high", default="dft", help="high fidelity name (labels <high>_energy, <high>_forces)")
    parser.add_argument("--subset", type=int, default=256, help="training geometries (seeded subset)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per arm (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<n> (training and inference)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--molecules", type=int, default=64, help="molecules for the inference section")
    parser.add_argument("--upstream-epochs", type=int, default=3, help="epochs per run in section 2")
    parser.add_argument("--upstream-repeats", type=int, default=2, help="alternating runs per tool in section 2")
    parser.add_argument("--no-rss", action="store_true", help="skip the `mace-mf train` child that measures peak RSS")
    parser.add_argument("--profile", action="store_true", help="write torch.profiler tables of one epoch per arm")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        print(f"error: --sections {','.join(unknown)}: not a section here (choose from {', '.join(SECTIONS)})")
        return 2
    missing = [f"--{n} {p}" for n, p in (("foundation", args.foundation), ("data", args.data)) if not p.is_file()]
    if missing:
        print(
            f"skipped: {'; '.join(missing)} not found (the defaults are in ../shared); "
            "pass --foundation and --data to run on other files"
        )
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("mace_mf").setLevel(logging.WARNING)
    import mace  # noqa: F401  (before e3nn, which the sections import)
    import torch

    from mace_mf.files import atomic_write_text

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python scripts/benchmark_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "options": {k: str(v) for k, v in vars(args).items()},
        "sections": {},
    }
    with tempfile.TemporaryDirectory(prefix="mace-mf-speed-") as scratch:
        ctx = Context(
            args.foundation.resolve(),
            args.data.resolve(),
            args.low,
            args.high,
            args.subset,
            args.repeats,
            args.batch_size,
            args.dtype,
            args.threads,
            args.molecules,
            Path(scratch),
            args.profile,
            args.out,
            rss=not args.no_rss,
            device=args.device,
            upstream_epochs=args.upstream_epochs,
            upstream_repeats=args.upstream_repeats,
        )
        for key in wanted:
            log.info("section %s", key)
            results["sections"][key] = SECTIONS[key](ctx)
    results["wall_s"] = time.perf_counter() - started
    results["load_average_after"] = os.getloadavg()
    results["peak_rss_MiB_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = markdown(results)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(args.out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
