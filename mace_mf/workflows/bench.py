"""Does multi-fidelity pay on this data? Train the comparison arms and score them side by side.

Every arm is the user's recipe plus ``--set`` overrides, so the arms differ only in what the issue
says they differ in (which labels are trained on, how heads are coupled) and share the foundation,
epochs, batch size and evaluation. The high fidelity's *forces* are never trained on except in the
``sf-high-ef`` oracle; where the validation/test files carry them, they score every arm.

closure = (F_RMSE(sf-high-e) − F_RMSE(arm)) / (F_RMSE(sf-high-e) − F_RMSE(sf-high-ef)): the share of
the benefit of high-level forces that an arm recovers without them (1 = as good as the oracle,
0 = no better than energies alone, < 0 = worse than energies alone).

Where validation/test configurations carry both levels' forces, the benchmark also scores the
low-level *labels* as if they were a model of the high level (``label_gap``). A model whose high
head only inherits the low level's forces cannot do better than that, so it bounds what coupling
alone can recover; anything beyond it must come from the high-level energies.

Without high-level forces in the validation data (the user's real case: CCSD(T) energies only), the
decision rests on displacement pairs (``data.valid_pairs``, mace_mf.data.pairs): each arm's directional
force ``F·u`` against the high level's finite difference of two energies. :func:`decide` picks the arm
with the lowest validation error (forces where they exist, else the pairs; never the oracle, which
needs the forces the user lacks) and says, from a paired bootstrap over the pairs, whether the
pairs resolve it from the runner-up, and how many high-level energies that rests on.

Runs live in ``<out>/<arm>/seed<k>[/frac<f>]``; a finished run (``run.json`` status complete) is
never rerun, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mace_mf.config.loading import dump_recipe, load_recipe
from mace_mf.config.schema import REPLAY_FIDELITY, TIED_STRENGTH, Recipe, ReplaySpec
from mace_mf.data.splits import split_tables
from mace_mf.data.store import cache_root, open_configurations
from mace_mf.data.table import LabelTable, label_table
from mace_mf.errors import RecipeError, RunError
from mace_mf.evaluation.metrics import INTERVAL_KEYS
from mace_mf.evaluation.pairs import paired_preference, rmse_interval, weighted_rmse
from mace_mf.files import atomic_write_text
from mace_mf.quiet import silence_known_noise
from mace_mf.run_folder import RunFolder
from mace_mf.train.threads import RUNS_ENV
from mace_mf.workflows.transfer import second_stage

log = logging.getLogger(__name__)

RESOLVED = 0.95  # share of bootstrap resamples of the pairs that must prefer the chosen arm
TIE = 1.05  # a 90 % bootstrap interval of the RMSE ratio inside [1/TIE, TIE]: the two arms are equal
# Arms that are not a recipe for the high level: the oracle needs the high-level forces the user lacks;
# the low head and the zero-shot foundation never see a high-level label (their high-level energies
# are the low level's, or the foundation's, with refitted E0s). They are scored, never recommended.
NOT_RECIPES = ("sf-high-ef", "sf-low", "zero-shot")
CLOSURE_NOTE = (
    "closure = (F RMSE of energies only − F RMSE of the arm) / (F RMSE of energies only − F RMSE of the oracle): "
    "the share of what {high} forces would teach that the arm recovers without them. 1: as good as the oracle; "
    "0: no better than {high} energies alone; below 0: worse than {high} energies alone (the low level's forces "
    "mislead the {high} head more than they help)."
)
PAIRS_NOTE = (
    "F·u RMSE, pairs: the displacement pairs' estimate of each arm's {high} validation force RMSE (mean over "
    "seeds ± their spread), with its 95 % bootstrap interval over the pairs in brackets; pairs for ±5 %: how many "
    "pairs would narrow that interval to ±5 % (it narrows as 1/sqrt(pairs))."
)
SCORED = ("e_rmse_meV_atom", "f_rmse_meV_A", "f_mae_meV_A", "fd_rmse_meV_A", "n_pairs")
DEFAULT_ARMS = ("zero-shot", "sf-high-e", "sf-high-ef", "sf-low", "mf", "mf-transfer")
DEFAULT_FRACTION_ARMS = ("sf-high-e", "mf", "mf-transfer")


@dataclass(frozen=True)
class Arm:
    """One way of training, as recipe overrides; ``fraction`` keeps high-level energies on a subset."""

    name: str
    overrides: tuple[str, ...]
    description: str
    runner: str = "mace_mf"  # or "mace_run_train": upstream mace-torch (mace_mf.workflows.upstream)
    start_from: str | None = None  # an arm whose high-level model (same seed and fraction) is the foundation


def standard_arms(recipe: Recipe, low: str, high: str) -> dict[str, Arm]:
    """The arms of the seed paper's comparison, one per coupling option (docs/benchmarks.md,
    "Fidelity coupling"; the schedule and embedding options on top of the recipe's own coupling), and
    upstream's own multi-head fine-tuning (``mace-mh``: the recipe as written, run by ``mace_run_train``)."""
    lo, hi = f"fidelities.{low}", f"fidelities.{high}"
    w_f = recipe.fidelities[low].forces_weight or 10.0
    off_low = (f"{lo}.energy_weight=0", f"{lo}.forces_weight=0", f"{hi}.base=null", f"{hi}.coupling=independent")
    no_prior = (f"{hi}.base_forces_weight=0", f"{hi}.coupling_strength=0")
    arms = [
        Arm("zero-shot", ("training.epochs=0",), "foundation with per-fidelity E0 refit only"),
        Arm("sf-high-e", (*off_low, *no_prior, f"{hi}.forces_weight=0"), f"{high} energies only"),
        Arm("sf-high-ef", (*off_low, *no_prior, f"{hi}.forces_weight={w_f}"), f"{high} energies + forces (oracle)"),
        Arm(
            "sf-low",
            (f"{hi}.energy_weight=0", f"{hi}.forces_weight=0", f"{hi}.base={low}", f"{hi}.coupling=delta", *no_prior),
            f"{low} energies + forces only, scored against {high}",
        ),
        Arm("mf", (), "the recipe as written"),
        Arm(
            "mf-independent",
            (f"{hi}.forces_weight=0", f"{hi}.base=null", f"{hi}.coupling=independent", *no_prior),
            "independent heads (mace-torch multi-head fine-tuning)",
        ),
        Arm(
            "mf-delta",
            (f"{hi}.forces_weight=0", f"{hi}.base={low}", f"{hi}.coupling=delta", *no_prior),
            f"{high} = {low} head + correction",
        ),
        Arm(
            "mf-tied",
            (f"{hi}.forces_weight=0", f"{hi}.base={low}", f"{hi}.coupling=tied", f"{hi}.coupling_strength=1.0"),
            f"{high} readout tied to {low}'s (L2 1.0)",
        ),
        Arm(
            "mf-prior",
            (f"{hi}.forces_weight=0", f"{hi}.base={low}", f"{hi}.coupling=independent", f"{hi}.base_forces_weight=1.0"),
            f"independent heads + {low} forces as a prior on {high} (weight 1)",
        ),
        Arm(
            "mf-transfer",
            ("transfer.enabled=true",),
            f"the recipe, then {high}'s labels alone from its {high} model (transfer learning: the low level's "
            f"forces first, then {high}'s energies; the second stage starts from the mf arm's model)",
            start_from="mf",
        ),
        Arm("mf-embedding", ("training.fidelity_embedding=true",), "the recipe + a fidelity embedding in the backbone"),
        Arm("mf-normalised", ("training.normalise_weights=true",), "the recipe + loss weights over label variance"),
        Arm("mf-warmup", ("training.freeze_backbone_epochs=1",), "the recipe + one heads-only warm-up epoch"),
        Arm(
            "mf-fps",
            (f"{hi}.label_selection=fps",),
            f"the recipe, {high} labels kept on geometries chosen by farthest-point sampling (at fractions < 1)",
        ),
        Arm(
            "mf-kmeans",
            (f"{hi}.label_selection=kmeans",),
            f"the recipe, {high} labels kept on the geometries nearest k-means centres (at fractions < 1)",
        ),
        Arm(
            "mf-disagreement",
            (f"{hi}.label_selection=disagreement",),
            f"the recipe, {high} labels kept where the foundation disagrees most with {low} (at fractions < 1)",
        ),
        Arm(
            "mf-replay",
            (
                "replay.enabled=true",
                f"replay.energy_weight={ReplaySpec.model_fields['energy_weight'].default}",
                f"replay.forces_weight={ReplaySpec.model_fields['forces_weight'].default}",
            ),
            "the recipe + replay of the foundation's level at the default weights (a recipe with replay weights 0 "
            "measures forgetting in every arm)",
        ),
        Arm(
            "mace-mh",
            (),
            "upstream mace_run_train multi-head fine-tuning: one head per fidelity, same data and weights",
            runner="mace_run_train",
        ),
    ]
    return {a.name: a for a in arms}


LOW_SCALED_ARM = re.compile(r"mf-low(\d+(?:\.\d*)?(?:e-?\d+)?)$")


def low_scaled_arms(names: list[str], recipe: Recipe, low: str, high: str) -> dict[str, Arm]:
    """``mf-low<s>`` arms among ``names``: the recipe with every term through which the low level
    reaches the high head scaled by ``s``: its energy and force weights, and the high head's coupling
    strength to it.

    ``s`` is the dial between the two ends: 1 is the recipe (the seed paper's multi-fidelity
    learning, the high head's forces from the low level), 0 trains what the high-level energies alone
    train. Where between them is best depends on how far the low level's forces are from the high
    level's against what the high-level energies teach, so ``bench`` tries several and picks on the
    pairs. (Scaling the force weight alone does not move the tied high head off the low level's
    forces: the coupling holds it there.)"""
    lo, hi = recipe.fidelities[low], recipe.fidelities[high]
    strength = (
        hi.coupling_strength if hi.coupling_strength is not None else (TIED_STRENGTH if hi.coupling == "tied" else 0.0)
    )
    found = {}
    for name in names:
        if match := LOW_SCALED_ARM.match(name):
            scale = float(match.group(1))
            overrides = (
                f"fidelities.{low}.energy_weight={lo.energy_weight * scale:g}",
                f"fidelities.{low}.forces_weight={lo.forces_weight * scale:g}",
                f"fidelities.{high}.coupling_strength={strength * scale:g}",
            )
            found[name] = Arm(name, overrides, f"the recipe with {low}'s weights and the coupling to it × {scale:g}")
    return found


def with_start_arms(arms: dict[str, Arm], names: list[str]) -> list[str]:
    """``names`` with the arm each transfer arm starts from, before it, where not already asked for."""
    result: list[str] = []
    for name in names:
        start = arms[name].start_from
        if start is not None and start not in names and start not in result:
            result.append(start)
        result.append(name)
    return result


def missing_labels(recipe: Recipe, train: LabelTable) -> list[str]:
    """The labels that ``recipe`` trains on (a weight above 0) and no training configuration carries."""
    missing = []
    for h, (name, spec) in enumerate(recipe.fidelities.items()):
        if spec.energy_key and spec.energy_weight > 0 and not train.energy_mask[:, h].any():
            missing.append(f"{name} energies ({spec.energy_key})")
        if spec.forces_key and spec.forces_weight > 0 and not train.forces_mask[:, h].any():
            missing.append(f"{name} forces ({spec.forces_key})")
    return missing


def runnable_arms(
    train: LabelTable,
    recipe_file: Path,
    common: list[str],
    arms: dict[str, Arm],
    asked: list[str] | None,
    default: tuple[str, ...],
    option: str,
) -> tuple[list[str], dict[str, str]]:
    """The arms to run, and the default arms left out with the reason: an arm that trains on labels
    the training data lacks (the oracle, where the high level has forces only in valid/test or
    nowhere) is left out of the defaults, and refused where ``option`` asks for it by name."""
    names = list(default) if asked is None else asked
    unknown = [a for a in names if a not in arms]
    if unknown:
        raise RecipeError(
            f"{option}: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(arms)}, or mf-low<scale>"
        )
    runnable, left_out = [], {}
    for name in names:
        missing = missing_labels(load_recipe(recipe_file, [*common, *arms[name].overrides]), train)
        if not missing:
            runnable.append(name)
            continue
        reason = f"{name} trains on {' and '.join(missing)}, which no training configuration carries"
        if asked is not None:
            raise RecipeError(f"{option}: {reason}; leave it out (the default arms do)")
        left_out[name] = reason
        log.warning("left out: %s", reason)
    return runnable, left_out


def _fraction_tag(fraction: float) -> str:
    return "" if fraction >= 1.0 else f"frac{fraction:g}"


def run_dir(out: Path, arm: str, seed: int, fraction: float) -> Path:
    path = out / arm / f"seed{seed}"
    tag = _fraction_tag(fraction)
    return path / tag if tag else path


def run_arm(recipe_file: Path, arm: Arm, seed: int, fraction: float, high: str, out: Path, common: list[str]) -> Path:
    """Train one arm (unless already complete with the same resolved recipe) and return its run folder."""
    from mace_mf.workflows.run import train_run

    path = run_dir(out, arm.name, seed, fraction)
    if int(os.environ.get(RUNS_ENV, "1")) > 1:  # runs side by side: say whose every log line is
        tag = str(path.relative_to(out))
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}: %(message)s"))
    overrides = [*common, *arm.overrides, f"seed={seed}"]
    if fraction < 1.0:
        overrides.append(f"fidelities.{high}.label_fraction={fraction}")
    recipe = load_recipe(recipe_file, overrides)
    if arm.start_from is not None:  # its first stage is the start arm's run
        recipe = second_stage(recipe, transfer_start(out, arm.start_from, seed, fraction, high))
    if arm.runner != "mace_run_train":  # the high-level file is always written: a transfer arm starts from it
        exported = None if recipe.export.fidelities is None else list(dict.fromkeys([*recipe.export.fidelities, high]))
        export = {"multihead": False, "torchscript": False, "fidelities": exported}
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update=export)})
    if RunFolder(path).complete():
        _check_reused(path, recipe)
        log.info("%s: complete, not rerun", path)
        return path
    if arm.runner == "mace_run_train":
        from mace_mf.workflows.upstream import upstream_arm

        log.info("%s: training with mace_run_train (%s)", path, arm.description)
        return upstream_arm(recipe, path)
    log.info("%s: training (%s)", path, arm.description)
    train_run(recipe, path, recipe_file, resume=RunFolder(path).started(), overwrite=False)
    return path


def transfer_start(out: Path, arm: str, seed: int, fraction: float, high: str) -> Path:
    """The exported high-level model of ``arm``'s run with the same seed and fraction: where a
    transfer arm starts (it runs after that arm, :func:`_run_jobs`)."""
    model = run_dir(out, arm, seed, fraction).resolve() / "models" / f"{high}.model"
    if not model.is_file():
        raise RunError(f"{model}: not found; the transfer arm starts from the {arm} arm's {high} model")
    return model


def _check_reused(path: Path, recipe: Recipe) -> None:
    """Refuse a finished arm trained with other settings (other --set options, an older default)."""
    from mace_mf.workflows.run import changes_from_saved

    if changes := changes_from_saved(path, recipe):
        raise RunError(
            f"{path}: finished with a different recipe ({changes}); pass the same "
            "--set options, or use a new --out (or remove that folder) to rerun it"
        )


def _worker_setup(level: int, workers: int) -> None:
    """A bench worker process: logging, known noise silenced, and the thread default told how many
    runs share the cores."""
    logging.basicConfig(level=level, format="%(asctime)s %(message)s")
    silence_known_noise()
    os.environ[RUNS_ENV] = str(workers)


def _run_jobs(
    recipe_file: Path, jobs: list[tuple[Arm, int, float]], high: str, out: Path, common: list[str], workers: int
) -> list[Path]:
    """Run folders of ``jobs`` in order, trained one by one or ``workers`` at a time; arms that start
    from another arm's model (``start_from``) in a second wave, after every other run."""
    waves = [[j for j in jobs if j[0].start_from is None], [j for j in jobs if j[0].start_from is not None]]
    done: dict[tuple[str, int, float], Path] = {}
    if workers <= 1:
        for arm, seed, fraction in (job for wave in waves for job in wave):
            done[(arm.name, seed, fraction)] = run_arm(recipe_file, arm, seed, fraction, high, out, common)
    else:
        # spawn, not fork: a forked child would inherit torch's thread pools and any open files mid-write.
        context = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        setup = (level, workers)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_setup, initargs=setup) as pool:
            for wave in waves:
                futures = {
                    (a.name, s, f): pool.submit(run_arm, recipe_file, a, s, f, high, out, common) for a, s, f in wave
                }
                done |= {key: future.result() for key, future in futures.items()}
    return [done[(arm.name, seed, fraction)] for arm, seed, fraction in jobs]


def _score(path: Path, high: str) -> dict[str, Any]:
    folder = RunFolder(path)
    metrics = folder.read_metrics()
    entry: dict[str, Any] = {"wall_time_s": folder.read_record().get("wall_time_s")}
    for split in ("valid", "test"):
        if split in metrics:
            m = metrics[split][high]
            entry[split] = {k: m.get(k) for k in SCORED}
    entry["forgetting"] = metrics.get("valid", {}).get(REPLAY_FIDELITY, {}).get("f_rmse_meV_A")
    return entry


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals)) if len(vals) > 1 else 0.0


def summarise(scores: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean ± std per arm key, plus closure against sf-high-e / sf-high-ef where both exist."""
    summary: dict[str, dict[str, Any]] = {}
    for key, runs in scores.items():
        row: dict[str, Any] = {"n": len(runs)}
        row["wall_time_s"], _ = _mean_std([r["wall_time_s"] for r in runs])
        row["forgetting"], row["forgetting_std"] = _mean_std([r.get("forgetting") for r in runs])
        for split in ("valid", "test"):
            for metric in ("f_rmse_meV_A", "f_mae_meV_A", "e_rmse_meV_atom", "fd_rmse_meV_A", "n_pairs"):
                mean, std = _mean_std([r.get(split, {}).get(metric) for r in runs])
                row[f"{split}/{metric}"] = mean
                row[f"{split}/{metric}_std"] = std
        summary[key] = row
    for split in ("valid", "test"):
        lo = summary.get("sf-high-e", {}).get(f"{split}/f_rmse_meV_A")
        hi = summary.get("sf-high-ef", {}).get(f"{split}/f_rmse_meV_A")
        for row in summary.values():
            value = row.get(f"{split}/f_rmse_meV_A")
            ok = None not in (lo, hi, value) and not math.isclose(lo, hi)
            row[f"{split}/closure"] = (lo - value) / (lo - hi) if ok else None
    return summary


def _labelled(recipe: Recipe) -> Recipe:
    """``recipe`` with data files that carry its computed labels (``fidelities.*.labels``), from the
    benchmark's shared label cache: computed once there, and read by every arm."""
    from mace_mf.labels.labelling import label_recipe_data

    cache = Path(recipe.data.label_cache) if recipe.data.label_cache else Path("label-cache")
    return label_recipe_data(recipe, cache)[0]


def label_gap(recipe: Recipe, low: str, high: str) -> dict[str, dict[str, float]]:
    """Per split, the low-level force labels scored against the high-level ones (where both exist).

    Labels computed on the fly (``fidelities.*.labels``) are read from the benchmark's shared label
    cache, which the arms' runs have filled, so nothing is recomputed here.
    """
    data_recipe = _labelled(recipe)
    names = list(recipe.fidelities)
    lo, hi = names.index(low), names.index(high)
    gaps: dict[str, dict[str, float]] = {}
    for split in ("valid", "test"):
        paths = getattr(data_recipe.data, split)
        if paths is None:
            continue
        configs = open_configurations(paths, recipe.data.format, cache_root(recipe.data.store_cache))
        table = label_table(configs, recipe.fidelities)
        keys = [recipe.fidelities[low].forces_key, recipe.fidelities[high].forces_key]
        both = np.flatnonzero(table.forces_mask[:, lo] & table.forces_mask[:, hi])
        squares, absolutes, components = 0.0, 0.0, 0
        for row in table.rows[both]:  # streamed: one configuration's forces at a time
            record = configs.record(int(row), (), keys)
            d = record.arrays[keys[0]] - record.arrays[keys[1]]
            squares, absolutes, components = (
                squares + float((d**2).sum()),
                absolutes + float(np.abs(d).sum()),
                components + d.size,
            )
        if components:
            gaps[split] = {
                "f_rmse_meV_A": float(np.sqrt(squares / components) * 1000.0),
                "f_mae_meV_A": float(absolutes / components * 1000.0),
                "configs": len(both),
            }
    return gaps


def gap_line(gaps: dict[str, dict[str, float]], summary: dict[str, dict[str, Any]], low: str, high: str) -> str:
    """The label gap and the closure the low-level labels themselves would score."""
    parts = []
    for split, gap in gaps.items():
        lo = summary.get("sf-high-e", {}).get(f"{split}/f_rmse_meV_A")
        hi = summary.get("sf-high-ef", {}).get(f"{split}/f_rmse_meV_A")
        closure = ""
        if lo is not None and hi is not None and not math.isclose(lo, hi):
            closure = f", closure {(lo - gap['f_rmse_meV_A']) / (lo - hi):.2f}"
        parts.append(f"{split} F RMSE {gap['f_rmse_meV_A']:.0f} meV/Å ({gap['configs']} configurations{closure})")
    if not parts:
        return ""
    return (
        f"{low} force labels scored as a model of {high}: " + "; ".join(parts) + ". A high head that only "
        f"inherits {low} forces cannot beat this; the rest must come from the {high} energies."
    )


def _fmt(mean: float | None, std: float | None = None, digits: int = 0) -> str:
    if mean is None:
        return "–"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std else "")


def _has_pairs(summary: dict[str, dict[str, Any]]) -> bool:
    return any(row.get("valid/fd_rmse_meV_A") is not None for row in summary.values())


def markdown_table(summary: dict[str, dict[str, Any]], high: str, arms: dict[str, Arm]) -> str:
    """The results table: test figures (valid closure alongside), one row per arm and fraction."""
    pairs = _has_pairs(summary)
    pair_head = f" {high} F·u RMSE valid, pairs (meV/Å) [95 %] | pairs for ±5 % |" if pairs else ""
    drift = any(row.get("forgetting") is not None for row in summary.values())
    pair_head += " foundation drift, held-out replay F RMSE (meV/Å) |" if drift else ""
    lines = [
        f"| arm | n | {high} F RMSE test (meV/Å) | {high} F MAE test | {high} E RMSE test (meV/atom) | "
        f"closure test | closure valid |{pair_head} wall (s) |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if pairs else "") + ("---|" if drift else ""),
    ]
    for key, row in summary.items():
        name = key.split("@")[0]
        label = f"`{key}`" + (f" ({arms[name].description})" if name in arms else "")
        pair_cell = ""
        if pairs:
            interval = ""
            if row.get("valid/fd_rmse_lo_meV_A") is not None:
                interval = f" [{row['valid/fd_rmse_lo_meV_A']:.0f}–{row['valid/fd_rmse_hi_meV_A']:.0f}]"
            needed = row.get("valid/fd_pairs_for_5pct")
            pair_cell = (
                f" {_fmt(row['valid/fd_rmse_meV_A'], row['valid/fd_rmse_meV_A_std'])}{interval} |"
                f" {'–' if needed is None else needed} |"
            )
        if drift:
            pair_cell += f" {_fmt(row.get('forgetting'), row.get('forgetting_std'), 1)} |"
        lines.append(
            f"| {label} | {row['n']} | {_fmt(row['test/f_rmse_meV_A'], row['test/f_rmse_meV_A_std'])} | "
            f"{_fmt(row['test/f_mae_meV_A'], row['test/f_mae_meV_A_std'])} | "
            f"{_fmt(row['test/e_rmse_meV_atom'], row['test/e_rmse_meV_atom_std'], 1)} | "
            f"{_fmt(row['test/closure'], digits=2)} | {_fmt(row['valid/closure'], digits=2)} |{pair_cell} "
            f"{_fmt(row['wall_time_s'])} |"
        )
    return "\n".join(lines) + "\n"


def verdict(summary: dict[str, dict[str, Any]], mf_arm: str) -> str:
    """One line: does multi-fidelity pay on the validation split of this data?"""
    mf, eo = summary.get(mf_arm, {}), summary.get("sf-high-e", {})
    f_mf, f_eo = mf.get("valid/f_rmse_meV_A"), eo.get("valid/f_rmse_meV_A")
    if f_mf is None or f_eo is None:
        e_mf, e_eo = mf.get("valid/e_rmse_meV_atom"), eo.get("valid/e_rmse_meV_atom")
        if e_mf is None or e_eo is None:
            return "no verdict: run the energy-only and multi-fidelity arms first"
        return (
            f"validation has no high-level forces and no displacement pairs, so force accuracy cannot be judged; "
            f"energy RMSE {e_mf:.1f} ({mf_arm}) vs {e_eo:.1f} meV/atom (energies only). To decide: "
            "mace-mf displace valid.xyz pairs.xyz --n 40, label the pairs with the high level "
            "(--energies-only) and set data.valid_pairs"
        )
    closure = mf.get("valid/closure")
    tail = f", closure {closure:.2f}" if closure is not None else ""
    if f_mf < f_eo:
        return f"multi-fidelity pays: valid F RMSE {f_mf:.0f} ({mf_arm}) vs {f_eo:.0f} meV/Å (energies only){tail}"
    return (
        f"multi-fidelity does NOT pay on this data: valid F RMSE {f_mf:.0f} ({mf_arm}) vs {f_eo:.0f} meV/Å "
        f"(energies only){tail}; train on the high-level energies alone"
    )


def pair_squared_errors(path: Path, high: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Per-pair squared directional-force errors of one run's high head (NaN where a pair has no
    high-level energies), the pairs' weights and the number of geometries; None without pairs."""
    file = RunFolder(path).pair_errors
    if not file.is_file():
        return None
    record = json.loads(file.read_text())
    errors = record["errors_meV_A"].get(high)
    if not errors or all(e is None for e in errors):
        return None
    values = np.array([np.nan if e is None else e for e in errors], dtype=float)
    return values**2, np.array(record["weights"], dtype=float), int(record.get("geometries", len(values)))


def seed_mean_squared_errors(paths: list[Path], high: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """:func:`pair_squared_errors` averaged over an arm's seeds (every seed's model counts), or None
    where a run has no pairs."""
    per_seed = [pair_squared_errors(path, high) for path in paths]
    if not per_seed or any(p is None for p in per_seed):
        return None
    _, weights, geometries = per_seed[0]  # type: ignore[misc]
    return np.nanmean(np.stack([p[0] for p in per_seed]), axis=0), weights, geometries  # type: ignore[index]


def add_pair_intervals(summary: dict[str, dict[str, Any]], runs: dict[str, list[Path]], high: str) -> None:
    """Each arm's pairs estimate with its uncertainty: the 95 % bootstrap interval over the pairs of
    the seed-averaged estimate, and the pairs that would narrow it to ±5 %."""
    for key, paths in runs.items():
        if (scored := seed_mean_squared_errors(paths, high)) is None:
            continue
        squared, weights, _ = scored
        usable = np.isfinite(squared)
        if usable.sum() > 1:
            interval = rmse_interval(squared[usable], weights[usable])
            summary[key].update({f"valid/{k}": v for k, v in zip(INTERVAL_KEYS, interval, strict=True)})


def recommendation(arm: Arm, recipe_file: Path, out: Path, common: list[str]) -> str:
    """The recipe that the chosen arm is, written whole to ``<out>/recommended.yaml`` (every key
    resolved, paths absolute: a file to keep and train with), and the command that trains it."""
    recipe = load_recipe(recipe_file, [*common, *arm.overrides])
    path = out / "recommended.yaml"
    atomic_write_text(path, dump_recipe(recipe))
    what = "the recipe as written" if not arm.overrides else f"{arm.name} ({arm.description})"
    return f"{what}: mace-mf train {path}"


def decide(
    runs: dict[str, list[Path]],
    summary: dict[str, dict[str, Any]],
    arms: dict[str, Arm],
    high: str,
    recipe_file: Path,
    mf_arm: str,
    out: Path,
    common: list[str],
    recommend: bool = True,
) -> dict[str, Any]:
    """Which arm to train: the lowest validation force error among the recipes for the high level
    (never :data:`NOT_RECIPES`); ``recommend`` writes the chosen recipe (:func:`recommendation`).

    On the high level's validation forces where every candidate has them; else on the displacement
    pairs (mean over seeds of each pair's squared error, so every seed's model counts); else none.
    ``preference`` is the share of bootstrap resamples of the pairs in which the choice beats the
    runner-up; the decision is ``resolved`` from 0.95, and a ``tie`` when the 90 % bootstrap interval
    of their RMSE ratio lies within 5 % of 1 (the pairs then show the two are equal, not which is better).
    """
    candidates = [k for k in runs if "@" not in k and k not in NOT_RECIPES]
    decision: dict[str, Any] = {"basis": None, "best": None, "runner_up": None, "resolved": False}

    def recommended(best: str) -> str:
        return f" Recommended: {recommendation(arms[best], recipe_file, out, common)}" if recommend else ""

    if len(candidates) < 2:
        decision["line"] = "no decision: run at least two arms besides the oracle"
        return decision
    forces = {k: summary[k].get("valid/f_rmse_meV_A") for k in candidates}
    if all(v is not None for v in forces.values()):
        ranked = sorted(candidates, key=lambda k: forces[k])
        best, second = ranked[:2]
        decision.update(basis="forces", best=best, runner_up=second, values={k: forces[k] for k in ranked})
        decision["resolved"] = True
        decision["line"] = (
            f"best on validation {high} forces: {best} ({forces[best]:.0f} meV/Å; next {second} "
            f"{forces[second]:.0f}).{recommended(best)}"
        )
        return decision
    squared: dict[str, np.ndarray] = {}
    weights, geometries = None, 0
    for key in candidates:
        if (scored := seed_mean_squared_errors(runs[key], high)) is not None:
            squared[key], weights, geometries = scored
    if len(squared) < 2 or weights is None:
        decision["line"] = (
            f"no decision on forces: validation has neither {high} forces nor labelled displacement pairs "
            "(mace-mf displace, then data.valid_pairs)"
        )
        return decision
    usable = np.all(np.isfinite(np.stack(list(squared.values()))), axis=0)
    w = weights[usable]
    values = {k: weighted_rmse(v[usable], w) for k, v in squared.items()}
    ranked = sorted(values, key=values.get)  # type: ignore[arg-type]
    best, second = ranked[:2]
    preference, low, high_ratio = paired_preference(squared[best][usable], squared[second][usable], w)
    n = int(usable.sum())
    resolved = preference >= RESOLVED
    tie = not resolved and low >= 1.0 / TIE and high_ratio <= TIE
    decision.update(
        basis="pairs",
        best=best,
        runner_up=second,
        values={k: values[k] for k in ranked},
        preference=preference,
        ratio_90=[low, high_ratio],
        resolved=resolved,
        tie=tie,
        n_pairs=n,
        n_energies=2 * n,
        geometries=geometries,
    )
    if mf_arm in squared and "sf-high-e" in squared:
        pays, _, _ = paired_preference(squared[mf_arm][usable], squared["sf-high-e"][usable], w)
        decision["verdict"] = (
            f"by {n} displacement pairs, multi-fidelity "
            + ("pays" if values[mf_arm] < values["sf-high-e"] else "does NOT pay")
            + f": valid F·u RMSE {values[mf_arm]:.0f} ({mf_arm}) vs {values['sf-high-e']:.0f} meV/Å (energies only), "
            f"{mf_arm} preferred in {pays:.0%} of resamples"
        )
    if resolved:
        state = "resolved"
    elif tie:
        state = f"a tie: the two are within {TIE - 1:.0%} of each other, and either is a sound choice"
    else:
        state = f"NOT resolved (below {RESOLVED:.0%}, and not a tie within {TIE - 1:.0%}): label more pairs"
    decision["line"] = (
        f"decided without {high} forces, on {n} displacement pairs ({2 * n} {high} energies, {geometries} "
        f"validation geometries): {best} has the lowest directional-force RMSE, {values[best]:.0f} meV/Å, "
        f"against {second} {values[second]:.0f} (RMSE ratio {low:.2f}–{high_ratio:.2f}, 90 % bootstrap); preferred in "
        f"{preference:.0%} of resamples of the pairs: {state}.{recommended(best)}"
    )
    return decision


def at_fraction(by_key: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The entries of the runs at one fraction of the high-level energies (keys ``arm@fraction``),
    keyed by arm name: what :func:`decide` chooses among at that fraction."""
    suffix = f"@{fraction:g}"
    return {key.removesuffix(suffix): value for key, value in by_key.items() if key.endswith(suffix)}


def learning_curve_plot(summary: dict[str, dict[str, Any]], arms: list[str], high: str, path: Path) -> None:
    """Test force RMSE against the fraction of high-level energies kept, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for arm in arms:
        points = []
        for key, row in summary.items():
            name, _, frac = key.partition("@")
            if name == arm and row["test/f_rmse_meV_A"] is not None:
                points.append((float(frac) if frac else 1.0, row["test/f_rmse_meV_A"], row["test/f_rmse_meV_A_std"]))
        if points:
            points.sort()
            x, y, err = zip(*points, strict=True)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel(f"fraction of training geometries with {high} energies")
    ax.set_ylabel(f"{high} test force RMSE (meV/Å)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    tmp.replace(path)


def run_benchmark(
    recipe_file: Path,
    out: Path,
    arm_names: list[str] | None,
    seeds: list[int],
    fractions: list[float],
    fraction_arms: list[str] | None,
    common: list[str],
    low: str | None = None,
    high: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run every (arm, seed[, fraction]) not yet complete; write results.json and results.md.

    ``arm_names`` / ``fraction_arms`` None: :data:`DEFAULT_ARMS` / :data:`DEFAULT_FRACTION_ARMS`,
    less those the training data cannot run (:func:`runnable_arms`). ``workers`` > 1 trains that
    many runs at once, each in its own process; the runs are independent, so the results do not
    depend on it.
    """
    common = ["transfer.enabled=false", *common]  # one stage per arm: mf-transfer is the two-stage recipe
    base = load_recipe(recipe_file, common)
    labelled = any(spec.labels is not None for spec in base.fidelities.values())
    if labelled and base.data.label_cache is None:  # one cache for every arm: on-the-fly labels computed once
        common = [*common, f"data.label_cache={(out / 'label-cache').resolve()}"]
        base = load_recipe(recipe_file, common)
    high = high or base.target
    others = [f for f in base.fidelities if f != high]
    low = low or (others[0] if others else None)
    if low is None or low not in base.fidelities or high not in base.fidelities:
        raise RecipeError(f"{recipe_file}: the benchmark needs a low and a high fidelity; pass --low/--high")
    arms = standard_arms(base, low, high)
    arms |= low_scaled_arms([*(arm_names or []), *(fraction_arms or [])], base, low, high)
    train = split_tables(_labelled(base)).train  # which labels the arms can train on, read once
    arm_names, left_out = runnable_arms(train, recipe_file, common, arms, arm_names, DEFAULT_ARMS, "--arms")
    fraction_arms, left_at_fractions = runnable_arms(
        train, recipe_file, common, arms, fraction_arms, DEFAULT_FRACTION_ARMS, "--fraction-arms"
    )
    left_out |= left_at_fractions if any(f < 1.0 for f in fractions) else {}
    arm_names, fraction_arms = with_start_arms(arms, arm_names), with_start_arms(arms, fraction_arms)
    jobs = [(arms[a], s, 1.0) for a in arm_names for s in seeds]
    jobs += [(arms[a], s, f) for f in fractions if f < 1.0 for a in fraction_arms for s in seeds]
    scores: dict[str, list[dict[str, Any]]] = {}
    folders: dict[str, list[Path]] = {}
    for (arm, seed, fraction), path in zip(jobs, _run_jobs(recipe_file, jobs, high, out, common, workers), strict=True):
        key = arm.name if fraction >= 1.0 else f"{arm.name}@{fraction:g}"
        scores.setdefault(key, []).append({"seed": seed, **_score(path, high)})
        folders.setdefault(key, []).append(path)
    summary = summarise(scores)
    add_pair_intervals(summary, folders, high)
    mf_arm = next((a for a in ("mf", *arm_names) if a in summary and a.startswith("mf")), "mf")
    decision = decide(folders, summary, arms, high, recipe_file, mf_arm, out, common)
    at_fractions = {
        f"{f:g}": decide(
            at_fraction(folders, f), at_fraction(summary, f), arms, high, recipe_file, mf_arm, out, common, False
        )
        for f in fractions
        if f < 1.0
    }
    gaps = label_gap(base, low, high)
    result = {
        "recipe": str(recipe_file),
        "low": low,
        "high": high,
        "common_overrides": common,
        "arms": {a.name: {"overrides": list(a.overrides), "description": a.description} for a in arms.values()},
        "runs": scores,
        "summary": summary,
        "label_gap": gaps,
        "left_out": left_out,
        "verdict": decision.get("verdict") or verdict(summary, mf_arm),
        "decision": decision,
        "fraction_decisions": at_fractions,
    }
    gap_text = gap_line(gaps, summary, low, high)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    atomic_write_text(
        out / "results.md",
        markdown_table(summary, high, arms)
        + "\n"
        + CLOSURE_NOTE.format(high=high)
        + "\n\n"
        + (PAIRS_NOTE.format(high=high) + "\n\n" if _has_pairs(summary) else "")
        + (gap_text + "\n\n" if gap_text else "")
        + "".join(f"Left out: {reason}.\n\n" for reason in left_out.values())
        + result["verdict"]
        + "\n\n"
        + decision["line"]
        + "\n"
        + "".join(
            f"\nWith {float(f):.0%} of the {high} energies: {d['line']}\n" for f, d in at_fractions.items() if d["best"]
        ),
    )
    if any(f < 1.0 for f in fractions):
        learning_curve_plot(summary, fraction_arms, high, out / "learning_curve.png")
    return result
