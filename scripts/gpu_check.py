"""GPU check: does mace_mf run right on a GPU, and how fast, against the floor the hardware allows.

    python scripts/gpu_check.py --out runs/gpu                              # on a CUDA machine (~6 min)
    python scripts/gpu_check.py --out runs/gpu-cpu --device cpu --quick     # anywhere (the test runs it)

One command, results in ``<out>/results.json`` and ``<out>/results.md``:

- ``agreement``: every head's energies and forces on the device against the CPU in float64 (target:
  1e-8 relative in float64; float32: the figure measured), and cuEquivariance against e3nn;
- ``speed``: per backend (e3nn, cuEquivariance where installed) and dtype (float32, float64): a
  training step (ms), graphs per second, peak device memory, and the floor: a bare forward + force +
  backward of the same model on the same batches; the step as a multiple of it (target 1.3);
- ``fidelities``: an epoch of two fidelities (low E+F, high E) over one (high E+F) (target 1.05);
- ``loading``: the share of a step spent waiting for batches built from a store by 2 workers
  (target 5 %);
- ``upstream``: a mace_mf epoch over a ``mace_run_train`` epoch on the same data (target 0.5; not
  with ``--quick``).

Defaults: ``../shared/models/spice_small_2022.model`` and pyseqm_chno's PM6/DFT training file (a
seeded subset); ``--foundation``, ``--data``, ``--low``, ``--high`` run it on other files. Times are
wall clock with the device synchronised, medians of ``--repeats`` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SECTIONS = ("agreement", "speed", "fidelities", "loading", "upstream")


def recipe_tree(ctx: argparse.Namespace, dtype: str, arm: str = "two", **training: Any) -> dict[str, Any]:
    low = {"energy_key": f"{ctx.low}_energy", "forces_key": f"{ctx.low}_forces", "forces_weight": 10.0}
    high = {"energy_key": f"{ctx.high}_energy", "forces_key": f"{ctx.high}_forces", "energy_weight": 10.0}
    fidelities = {ctx.low: low, ctx.high: {**high, "forces_weight": 0.0}} if arm == "two" else {ctx.high: high}
    return {
        "name": "gpu-check",
        "dtype": dtype,
        "device": ctx.device,
        "num_threads": ctx.threads,
        "foundation": {"model": str(ctx.foundation)},
        "fidelities": fidelities,
        "data": {
            "train": str(ctx.data),
            "valid_fraction": 0.1,
            "max_train": ctx.subset,
            "store_cache": str(ctx.scratch / "stores"),
        },
        "training": {"epochs": 1, "batch_size": ctx.batch_size, "target": ctx.high, **training},
        "md_check": {"enabled": False},
        "wandb": {"mode": "disabled"},
    }


def prepared(ctx: argparse.Namespace, tree: dict[str, Any]) -> Any:
    import torch

    from mace_mf.config.loading import recipe_from_dict
    from mace_mf.workflows.prepare import prepare

    recipe = recipe_from_dict(tree, "gpu_check", ROOT)
    return recipe, prepare(recipe, ctx.scratch / "labels", torch.device(ctx.device))


def sync(ctx: argparse.Namespace) -> None:
    import torch

    if ctx.device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(ctx: argparse.Namespace, work: Any) -> float:
    sync(ctx)
    start = time.perf_counter()
    work()
    sync(ctx)
    return time.perf_counter() - start


# ---- sections -------------------------------------------------------------------------------------


def section_agreement(ctx: argparse.Namespace) -> dict[str, Any]:
    """Every head's energies and forces on the device against the CPU in float64."""
    import copy
    from dataclasses import replace

    import torch

    from mace_mf.data.graphs import Split
    from mace_mf.evaluation.predict import predict
    from mace_mf.model.cueq import cueq_available, to_cueq

    recipe, ready = prepared(ctx, recipe_tree(ctx, "float64"))
    cpu = copy.deepcopy(ready.model).cpu()
    valid = ready.splits.valid
    heads = list(range(len(recipe.fidelities)))

    def outputs(model: Any, device: str) -> tuple[np.ndarray, list[np.ndarray]]:
        dtype = next(model.parameters()).dtype
        split = (
            valid if dtype == torch.float64 else Split("valid", valid.table, replace(valid.recipe, dtype=dtype), True)
        )
        pred = predict(model.to(device), split, heads, 16, torch.device(device))
        return pred.energies, [np.concatenate([p for _, p, _ in pred.forces[h]]) for h in heads]

    reference = outputs(cpu, "cpu")
    result: dict[str, Any] = {"configurations": len(valid), "heads": list(recipe.fidelities)}

    def compare(name: str, model: Any) -> None:
        energies, forces = outputs(model, ctx.device)
        result[name] = {
            "energy_max_relative": float(np.max(np.abs(energies - reference[0]) / np.abs(reference[0]))),
            "forces_max_abs_eV_A": float(max(np.max(np.abs(f - r)) for f, r in zip(forces, reference[1], strict=True))),
        }

    compare("device_float64", copy.deepcopy(cpu))
    compare("device_float32", copy.deepcopy(cpu).float())
    if cueq_available():
        compare("device_float64_cueq", to_cueq(copy.deepcopy(cpu).to(ctx.device)))
    result["target_met"] = result["device_float64"]["energy_max_relative"] <= 1e-8
    return result


def _floor_ms(ctx: argparse.Namespace, model: Any, batches: list[Any], heads: list[int]) -> float:
    """A bare forward + force + backward of the model on prebuilt batches: what no trainer can beat."""

    from mace_mf.data.graphs import batch_dict
    from mace_mf.model.forward import fidelity_energies, fidelity_forces

    def run() -> None:
        for batch in batches:
            data = batch_dict(batch)
            energies = fidelity_energies(model, data, heads)
            (forces,) = fidelity_forces(energies, data["positions"], [0], create_graph=True)
            (energies.square().sum() + forces.square().sum()).backward()
            model.zero_grad(set_to_none=True)

    run()  # warm-up
    times = [timed(ctx, run) for _ in range(ctx.repeats)]
    return 1000 * float(np.median(times)) / len(batches)


def _step_ms(ctx: argparse.Namespace, trainer: Any, steps: int) -> float:
    trainer.train_epoch(0, None)  # warm-up (and the DataLoader's workers)
    times = [timed(ctx, lambda e=e: trainer.train_epoch(e, None)) for e in range(1, ctx.repeats + 1)]
    return 1000 * float(np.median(times)) / steps


def section_speed(ctx: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mace_mf.model.cueq import cueq_available
    from mace_mf.train.trainer import Trainer

    backends = ["e3nn", *(["cueq"] if cueq_available() else [])]
    result: dict[str, Any] = {"steps": ctx.steps, "batch_size": ctx.batch_size}
    for dtype in ("float32", "float64"):
        for backend in backends:
            tree = recipe_tree(ctx, dtype, steps_per_epoch=ctx.steps, cueq=backend == "cueq")
            recipe, ready = prepared(ctx, tree)
            if ctx.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(ready.model, recipe, ready.splits.train, ready.splits.valid, torch.device(ctx.device),
                              ctx.scratch / f"ckpt-{dtype}-{backend}")  # fmt: skip
            step = _step_ms(ctx, trainer, ctx.steps)
            loader = ready.splits.train.loader(ctx.batch_size, shuffle=True, seed=1, steps=ctx.steps)
            batches = [b.to(ctx.device) for b in loader]
            floor = _floor_ms(ctx, ready.model, batches, [len(recipe.fidelities) - 1])
            peak = torch.cuda.max_memory_allocated() / 2**20 if ctx.device.startswith("cuda") else None
            result[f"{backend}-{dtype}"] = {
                "step_ms": round(step, 2),
                "floor_ms": round(floor, 2),
                "step_over_floor": round(step / floor, 3),
                "graphs_per_s": round(1000 * ctx.batch_size / step, 1),
                "peak_device_memory_mib": None if peak is None else round(peak),
            }
    main = result.get("e3nn-float32", {})
    result["float64_over_float32"] = round(result["e3nn-float64"]["step_ms"] / main["step_ms"], 3)
    if "cueq-float32" in result:
        result["e3nn_over_cueq_float32"] = round(main["step_ms"] / result["cueq-float32"]["step_ms"], 3)
    result["target_met"] = main["step_over_floor"] <= 1.3
    return result


def section_fidelities(ctx: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mace_mf.train.trainer import Trainer

    steps: dict[str, float] = {}
    for arm in ("one", "two"):
        recipe, ready = prepared(ctx, recipe_tree(ctx, ctx.dtype, arm, steps_per_epoch=ctx.steps))
        trainer = Trainer(ready.model, recipe, ready.splits.train, ready.splits.valid, torch.device(ctx.device),
                          ctx.scratch / f"ckpt-{arm}")  # fmt: skip
        steps[arm] = _step_ms(ctx, trainer, ctx.steps)
    ratio = steps["two"] / steps["one"]
    return {"step_ms": {k: round(v, 2) for k, v in steps.items()}, "two_over_one": round(ratio, 3),
            "target_met": ratio <= 1.05}  # fmt: skip


def section_loading(ctx: argparse.Namespace) -> dict[str, Any]:
    """Time the trainer spends waiting for its next batch (graphs built from the store by 2 workers)."""
    import torch

    from mace_mf.train.trainer import Trainer

    tree = recipe_tree(ctx, ctx.dtype, steps_per_epoch=ctx.steps, num_workers=2)
    tree["data"]["keep_graphs"] = False
    recipe, ready = prepared(ctx, tree)
    trainer = Trainer(ready.model, recipe, ready.splits.train, ready.splits.valid, torch.device(ctx.device),
                      ctx.scratch / "ckpt-loading")  # fmt: skip
    waited = {"s": 0.0}
    original = trainer._batches

    def timed_batches(epoch: int) -> Any:
        loader = original(epoch)

        def iterate() -> Any:
            iterator = iter(loader)
            while True:
                start = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                waited["s"] += time.perf_counter() - start
                yield batch

        class Wrapped:
            def __len__(self) -> int:
                return len(loader)

            def __iter__(self) -> Any:
                return iterate()

        return Wrapped()

    trainer._batches = timed_batches
    trainer.train_epoch(0, None)  # warm-up: worker start
    waited["s"] = 0.0
    total = sum(timed(ctx, lambda e=e: trainer.train_epoch(e, None)) for e in range(1, ctx.repeats + 1))
    share = waited["s"] / total
    return {"waiting_share": round(share, 4), "target_met": share < 0.05}


def section_upstream(ctx: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mace_mf.config.loading import recipe_from_dict
    from mace_mf.train.trainer import Trainer
    from mace_mf.workflows.upstream import run_upstream

    tree = recipe_tree(ctx, ctx.dtype, epochs=3)
    recipe = recipe_from_dict(tree, "gpu_check", ROOT)
    upstream = run_upstream(recipe, ctx.scratch / "upstream", epochs=3, overwrite=True)
    recipe, ready = prepared(ctx, tree)
    trainer = Trainer(ready.model, recipe, ready.splits.train, ready.splits.valid, torch.device(ctx.device),
                      ctx.scratch / "ckpt-upstream")  # fmt: skip

    def epoch(e: int) -> None:  # training and validation of every head, as upstream's epoch
        trainer.train_epoch(e, None)
        trainer.evaluate(ready.splits.valid)

    epoch(0)
    ours = float(np.median([timed(ctx, lambda e=e: epoch(e)) for e in range(1, 3)]))
    theirs = float(np.median(upstream.epoch_s[1:] or upstream.epoch_s))
    return {"mace_mf_epoch_s": round(ours, 2), "mace_run_train_epoch_s": round(theirs, 2),
            "ratio": round(ours / theirs, 3), "target_met": ours / theirs <= 0.5}  # fmt: skip


def machine(ctx: argparse.Namespace) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": ctx.device}
    if ctx.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(ctx.device))
        info["cuda"] = torch.version.cuda
    info["cpu_count"] = os.cpu_count()
    info["load_average"] = round(os.getloadavg()[0], 2)
    return info


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# GPU check",
        "",
        f"`{' '.join(sys.argv)}`",
        "",
        "```json",
        json.dumps(results["machine"], indent=2),
        "```",
        "",
    ]
    for name, section in results["sections"].items():
        lines += [f"## {name}", "", "```json", json.dumps(section, indent=2), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps, no upstream run: checks the script")
    parser.add_argument("--sections", default=None, help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--foundation", type=Path, default=SHARED / "models" / "spice_small_2022.model")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "pyseqm_chno" / "train.xyz")
    parser.add_argument("--low", default="pm6")
    parser.add_argument("--high", default="dft")
    parser.add_argument("--subset", type=int, default=1024, help="training geometries")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="dtype of the fidelities, loading and upstream sections")
    parser.add_argument("--threads", type=int, default=4)
    ctx = parser.parse_args(argv)
    for path in (ctx.foundation, ctx.data):
        if not path.exists():
            print(f"{path} is not here (../shared, or give --foundation/--data); nothing run")
            return 0
    import torch

    if ctx.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu (and --quick) to check the script itself")
        return 0
    if ctx.quick:
        ctx.subset, ctx.steps, ctx.repeats = min(ctx.subset, 48), min(ctx.steps, 2), 1
    chosen = (ctx.sections or ",".join(s for s in SECTIONS if not (ctx.quick and s == "upstream"))).split(",")
    ctx.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(ctx), "sections": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        ctx.scratch = Path(scratch)
        for name in chosen:
            print(f"section {name}", flush=True)
            results["sections"][name] = globals()[f"section_{name}"](ctx)
            print(json.dumps(results["sections"][name], indent=2), flush=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    (ctx.out / "results.json").write_text(json.dumps(results, indent=2))
    (ctx.out / "results.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
