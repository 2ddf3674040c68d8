"""Hyperparameter sweeps from one standard W&B sweep file whose parameter names are dotted recipe keys.

Online (a W&B key and a reachable server), W&B runs the search: ``wandb.sweep`` registers the file
and ``wandb.agent`` hands out trials (grid, random, bayes). Offline or with W&B disabled, the same
file runs here: grid and random search (random seeded, trial ``i`` drawn from ``(seed, i)`` alone,
so a longer ``--count`` extends a sweep without changing its first trials); bayes needs W&B's
server and is refused in one line.

Every trial is a complete training run in ``<sweep folder>/trials/trial-NNN/`` (an offline W&B run
in the sweep's group when W&B is offline). ``trial.json`` records its parameters, status and
metric; a trial that fails (a bad value, a non-finite loss, anything) is recorded ``failed`` and the
sweep goes on. Ctrl-C stops after the running trial; a second Ctrl-C stops at once (that trial
resumes from its checkpoint next time). Running the same command on the same folder again continues
the sweep: trials that completed or failed are kept, not rerun. After each trial the ranked table
``trials.json`` / ``trials.md`` is rewritten (atomically), ranked by the sweep metric and its goal.

The metric of a trial, for a per-epoch name (``valid/dft/f_rmse_meV_A``), is its best value over the
epochs (min or max, as the goal says: a trial is judged by its best epoch, not by its last); for a
``final/<split>/...`` name it is the final value (of the exported, best-checkpoint weights). A
validation force RMSE that the data cannot give (no high-level forces) is read from the displacement
pairs instead (``final/valid/<f>/fd_rmse_meV_A``, ``data.valid_pairs``), and the table says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mace_mf.config.loading import load_recipe, parse_override
from mace_mf.config.messages import dotted_key_problem
from mace_mf.config.schema import Recipe
from mace_mf.errors import RecipeError, RunError, UserError
from mace_mf.files import atomic_write_text
from mace_mf.run_folder import RunFolder
from mace_mf.train.tracking import effective_mode, flatten_epoch, flatten_final, metric_names

log = logging.getLogger(__name__)

SWEEP_KEYS = {
    "method",
    "metric",
    "parameters",
    "name",
    "description",
    "project",
    "entity",
    "run_cap",
    "early_terminate",
    "program",
    "command",
}
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
    "normal",
    "q_normal",
    "log_normal",
)
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")
STATE_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
DONE = ("complete", "failed")


@dataclass
class Sweep:
    """A validated sweep file."""

    source: str
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    name: str | None
    run_cap: int | None
    raw: dict[str, Any] = field(repr=False)

    def choose(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` beats ``b``."""
        return a < b if self.goal == "minimize" else a > b


def load_sweep(path: Path, recipe: Recipe) -> Sweep:
    """Read and check a W&B sweep file against the recipe it will vary (names, metric, method)."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: sweep file not found; check the path") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: malformed YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a sweep file is a mapping with method, metric and parameters")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown key {unknown[0]!r}; a W&B sweep file has {', '.join(sorted(SWEEP_KEYS))}")
    method = raw.get("method")
    if method not in METHODS:
        raise RecipeError(f"{path}: method: {method!r} is not one of {', '.join(METHODS)}")
    metric = raw.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise RecipeError(f"{path}: metric: give `metric: {{name: valid/<fidelity>/f_rmse_meV_A, goal: minimize}}`")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise RecipeError(f"{path}: metric.goal: {goal!r} is not minimize or maximize")
    known = metric_names(recipe)
    if metric["name"] not in known:
        import difflib

        close = difflib.get_close_matches(metric["name"], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else " (e.g. valid/<fidelity>/f_rmse_meV_A)"
        raise RecipeError(f"{path}: metric.name {metric['name']!r} is not a metric mace_mf logs{hint}")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise RecipeError(f"{path}: parameters: give at least one dotted recipe key, e.g. training.lr")
    checked = {name: _check_parameter(source, name, spec, recipe, method) for name, spec in parameters.items()}
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise RecipeError(f"{path}: run_cap: {run_cap!r} is not a positive integer")
    return Sweep(source, method, metric["name"], goal, checked, raw.get("name"), run_cap, raw)


def _check_parameter(source: str, name: str, spec: Any, recipe: Recipe, method: str) -> dict[str, Any]:
    where = f"{source}: parameters.{name}"
    if not isinstance(spec, dict):
        raise RecipeError(f"{where}: give `{{values: [...]}}`, `{{value: x}}` or a distribution with min/max")
    if "parameters" in spec:
        raise RecipeError(f"{where}: nested parameters are not supported; name the key dotted (e.g. training.lr)")
    problem = dotted_key_problem(recipe, name)
    if problem is not None:
        raise RecipeError(f"{source}: parameters: {problem}")
    spec = dict(spec)
    distribution = spec.get("distribution") or _implied_distribution(spec)
    if distribution not in DISTRIBUTIONS:
        raise RecipeError(f"{where}: distribution {distribution!r} is not one of {', '.join(DISTRIBUTIONS)}")
    spec["distribution"] = distribution
    needs = {
        "constant": ("value",),
        "categorical": ("values",),
        "normal": ("mu", "sigma"),
        "q_normal": ("mu", "sigma"),
        "log_normal": ("mu", "sigma"),
    }.get(distribution, ("min", "max"))
    missing = [k for k in needs if k not in spec]
    if missing:
        raise RecipeError(f"{where}: {distribution} needs {' and '.join(needs)}")
    if distribution == "categorical" and (not isinstance(spec["values"], list) or not spec["values"]):
        raise RecipeError(f"{where}: values must be a non-empty list")
    if method == "grid" and distribution not in GRID_DISTRIBUTIONS:
        raise RecipeError(
            f"{where}: grid search needs values, value, int_uniform or q_uniform, not {distribution}; "
            "give values or use method: random"
        )
    return spec


def _implied_distribution(spec: dict[str, Any]) -> str | None:
    """W&B's defaults: values → categorical, value → constant, integer bounds → int_uniform."""
    if "values" in spec:
        return "categorical"
    if "value" in spec:
        return "constant"
    if "min" in spec and "max" in spec:
        return "int_uniform" if isinstance(spec["min"], int) and isinstance(spec["max"], int) else "uniform"
    if "mu" in spec:
        return "normal"
    return None


def _grid_values(spec: dict[str, Any]) -> list[Any]:
    d = spec["distribution"]
    if d == "constant":
        return [spec["value"]]
    if d == "categorical":
        return list(spec["values"])
    if d == "int_uniform":
        return list(range(int(spec["min"]), int(spec["max"]) + 1))
    q = float(spec.get("q", 1.0))
    count = math.floor((float(spec["max"]) - float(spec["min"])) / q + 1e-9) + 1
    return [float(spec["min"]) + i * q for i in range(count)]


def _sample(spec: dict[str, Any], rng: np.random.Generator) -> Any:
    d = spec["distribution"]
    q = float(spec.get("q", 1.0))
    if d == "constant":
        return spec["value"]
    if d == "categorical":
        p = spec.get("probabilities")
        return spec["values"][int(rng.choice(len(spec["values"]), p=p))]
    if d == "int_uniform":
        return int(rng.integers(int(spec["min"]), int(spec["max"]) + 1))
    if d in ("normal", "q_normal", "log_normal"):
        x = float(rng.normal(float(spec["mu"]), float(spec["sigma"])))
        return math.exp(x) if d == "log_normal" else (round(x / q) * q if d == "q_normal" else x)
    lo, hi = float(spec["min"]), float(spec["max"])
    if d == "uniform":
        return float(rng.uniform(lo, hi))
    if d == "q_uniform":
        return round(float(rng.uniform(lo, hi)) / q) * q
    if d == "log_uniform":  # bounds are natural logarithms
        return math.exp(float(rng.uniform(lo, hi)))
    x = math.exp(float(rng.uniform(math.log(lo), math.log(hi))))  # log_uniform_values, q_log_uniform_values
    return round(x / q) * q if d == "q_log_uniform_values" else x


def plan(sweep: Sweep, count: int | None, seed: int) -> list[dict[str, Any]]:
    """The parameter values of trials 0, 1, ... (grid: every combination in file order, last fastest)."""
    if sweep.method == "bayes":
        raise RecipeError(
            f"{sweep.source}: method bayes needs the W&B server (wandb.mode online with a key); "
            "use grid or random to sweep offline"
        )
    count = count if count is not None else sweep.run_cap
    names = list(sweep.parameters)
    if sweep.method == "grid":
        axes = [_grid_values(spec) for spec in sweep.parameters.values()]
        combos = [dict(zip(names, values, strict=True)) for values in product(*axes)]
        return combos[:count] if count is not None else combos
    if count is None:
        raise RecipeError(f"{sweep.source}: random search needs a number of trials; pass --count N or set run_cap")
    specs = list(sweep.parameters.values())
    # Each value from its own stream (seed, trial, parameter): adding a parameter leaves the others' draws alone.
    return [
        {name: _sample(specs[j], np.random.default_rng([seed, i, j])) for j, name in enumerate(names)}
        for i in range(count)
    ]


def agent_parameters(path: str | Path) -> dict[str, Any]:
    """The parameters W&B's agent gives a trial: ``wandb_version: 1`` plus ``{name: {value: v}}``."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    loaded.pop("wandb_version", None)
    return {name: entry["value"] for name, entry in loaded.items()}


def pairs_fallback(metric: str) -> str | None:
    """The pairs' estimate of a validation force RMSE metric (``valid/<f>/f_rmse_meV_A`` or its
    ``final/`` value): what ranks trials when the validation data hold no forces of that fidelity."""
    parts = metric.removeprefix("final/").split("/")
    if len(parts) == 3 and parts[0] == "valid" and parts[2] == "f_rmse_meV_A":
        return f"final/valid/{parts[1]}/fd_rmse_meV_A"
    return None


def trial_metric(folder: Path, metric: str, goal: str) -> tuple[float | None, str]:
    """The trial's value of the sweep metric (see the module docstring), None if never logged, and
    the metric it was read from: a validation force RMSE that no force label could give is read from
    the displacement pairs (:func:`pairs_fallback`)."""
    value = _metric_value(folder, metric, goal)
    fallback = pairs_fallback(metric)
    if value is None and fallback is not None:
        return _metric_value(folder, fallback, goal), fallback
    return value, metric


def _metric_value(folder: Path, metric: str, goal: str) -> float | None:
    if metric.startswith("final/"):
        path = RunFolder(folder).metrics
        values = [flatten_final(json.loads(path.read_text())).get(metric)] if path.is_file() else []
    else:
        path = RunFolder(folder).history
        epochs = json.loads(path.read_text())["epochs"] if path.is_file() else []
        values = [flatten_epoch(record).get(metric) for record in epochs]
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return min(finite) if goal == "minimize" else max(finite)


class StopAfterTrial:
    """Ctrl-C handling of a local sweep: the first press asks to stop after the running trial, the
    second raises KeyboardInterrupt at once. Outside the main thread signals cannot be caught, so
    there Ctrl-C keeps Python's default; a process started with SIGINT ignored (``nohup``, a
    script's background job) keeps ignoring it, as the user who launched it that way asked."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopAfterTrial:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: the sweep stops after the running trial (press again to stop now)")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class SweepRun:
    """Where a sweep lives and what every trial shares."""

    sweep: Sweep
    recipe_file: Path
    overrides: list[str]
    out: Path
    mode: str
    group: str

    def trial_recipe(self, name: str, params: dict[str, Any]) -> Recipe:
        values = {**params, "wandb.mode": self.mode, "wandb.group": self.group, "wandb.name": f"{self.group}-{name}"}
        if self.sweep.raw.get("project"):
            values["wandb.project"] = self.sweep.raw["project"]
        if self.sweep.raw.get("entity"):
            values["wandb.entity"] = self.sweep.raw["entity"]
        return load_recipe(self.recipe_file, self.overrides, values)

    def run_trial(self, name: str, params: dict[str, Any], index: int | None = None) -> dict[str, Any]:
        """One full training run in ``trials/<name>``; its record, whatever happened."""
        from mace_mf.workflows.run import train_run

        folder = self.out / "trials" / name
        record: dict[str, Any] = {"trial": name, "index": index, "params": params, "status": "running"}
        started = time.perf_counter()
        log.info("trial %s: %s", name, ", ".join(f"{k}={v}" for k, v in params.items()))
        try:
            recipe = self.trial_recipe(name, params)
            earlier = RunFolder(folder).started()
            train_run(recipe, folder, recipe_file=self.recipe_file, resume=earlier, overwrite=not earlier)
            record["status"] = "complete"
        except KeyboardInterrupt:
            record["status"] = "interrupted"
            raise
        except Exception as exc:
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            folder.mkdir(parents=True, exist_ok=True)
            if not isinstance(exc, UserError):
                atomic_write_text(folder / "error.txt", traceback.format_exc())
            log.warning("trial %s failed: %s", name, record["error"])
        finally:
            record["wall_time_s"] = round(time.perf_counter() - started, 1)
            record["wandb_id"] = RunFolder(folder).read_record().get("wandb_id")
            record["metric"], used = trial_metric(folder, self.sweep.metric, self.sweep.goal)
            if used != self.sweep.metric:
                record["metric_from"] = used
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / TRIAL_FILE, json.dumps(record, indent=2))
        return record

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(path.read_text()) for path in sorted((self.out / "trials").glob(f"*/{TRIAL_FILE}"))]


def ranked(records: list[dict[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """Trials best first: completed with a metric (by goal), then without one, then the rest."""
    sign = 1.0 if sweep.goal == "minimize" else -1.0

    def key(r: dict[str, Any]) -> tuple[int, float, str]:
        if r["status"] == "complete" and r.get("metric") is not None:
            return (0, sign * r["metric"], r["trial"])
        return (1 if r["status"] == "complete" else 2, 0.0, r["trial"])

    result = sorted(records, key=key)
    rank = 0
    for r in result:
        has = r["status"] == "complete" and r.get("metric") is not None
        rank += has
        r["rank"] = rank if has else None
    return result


def table_rows(trials: list[dict[str, Any]], sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the ranked table (terminal and Markdown): the parameters that
    vary (pinned ones are in ``trials.json``), and a note column when some trial failed."""
    names = [n for n, spec in sweep.parameters.items() if spec["distribution"] != "constant"]
    notes = any(r.get("error") for r in trials)
    header = ["rank", "trial", "status", sweep.metric, *names, "wall (s)", *(["note"] if notes else [])]
    rows = []
    for r in trials:
        rank = "–" if r.get("rank") is None else str(r["rank"])
        metric = "–" if r.get("metric") is None else f"{r['metric']:.6g}"
        values = [_fmt(r["params"].get(n)) for n in names]
        row = [rank, r["trial"], r["status"], metric, *values, f"{r.get('wall_time_s', 0):.0f}"]
        rows.append(row + ([r.get("error") or ""] if notes else []))
    return header, rows


def _fmt(value: Any) -> str:
    """A parameter value as a recipe would spell it (``0.002``, ``true``, ``null``, ``{"H": -13.6}``)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value)


def write_table(run: SweepRun) -> list[dict[str, Any]]:
    """Rewrite ``trials.json`` and ``trials.md`` from the trial folders; return the ranked trials."""
    trials = ranked(run.records(), run.sweep)
    summary = {
        "sweep": run.sweep.source,
        "method": run.sweep.method,
        "metric": run.sweep.metric,
        "goal": run.sweep.goal,
        "group": run.group,
        "trials": trials,
    }
    atomic_write_text(run.out / "trials.json", json.dumps(summary, indent=2))
    header, rows = table_rows(trials, run.sweep)
    varied = [n for n, spec in run.sweep.parameters.items() if spec["distribution"] != "constant"]
    pinned = [f"`{n}={_fmt(spec['value'])}`" for n, spec in run.sweep.parameters.items() if n not in varied]
    lines = [
        f"# Sweep `{run.group}`: {run.sweep.method} over {', '.join(varied) or 'nothing'}",
        "",
        *([f"Every trial: {', '.join(pinned)}."] if pinned else []),
        "",
        f"Ranked by `{run.sweep.metric}` ({run.sweep.goal}); trial folders under `trials/`."
        + "".join(
            sorted(
                {
                    f" Without validation forces, `{t['metric_from']}` (displacement pairs) stands in for it."
                    for t in trials
                    if t.get("metric_from")
                }
            )
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    atomic_write_text(run.out / "trials.md", "\n".join(lines) + "\n")
    return trials


def _claim(run: SweepRun, base: Recipe, seed: int) -> None:
    """Record what this sweep is; refuse a folder that holds a different one."""
    state = {
        "sweep": run.sweep.raw,
        "recipe": base.model_dump(mode="json", exclude={"wandb"}),
        "seed": seed,
        "group": run.group,
    }
    path = run.out / STATE_FILE
    if path.is_file():
        earlier = json.loads(path.read_text())
        keys = ("sweep", "recipe", "seed")
        if {k: earlier.get(k) for k in keys} != {k: state[k] for k in keys}:
            raise RunError(
                f"{run.out}: holds a different sweep (sweep file, recipe, --set or --seed differ); "
                "rerun with the same ones to continue it, or choose another --out"
            )
        run.group = earlier["group"]
        return
    atomic_write_text(path, json.dumps(state, indent=2))


def default_out(recipe: Recipe, sweep: Sweep) -> Path:
    return Path("runs") / f"{sweep.name or recipe.name + '-sweep'}-{datetime.now():%Y%m%d-%H%M%S}"


@dataclass
class SweepResult:
    """What a sweep command reports: its folder, the sweep, the ranked trials, whether Ctrl-C cut it short."""

    folder: Path
    sweep: Sweep
    trials: list[dict[str, Any]]
    stopped: bool


def run_sweep(
    recipe_file: Path,
    sweep_file: Path,
    overrides: list[str],
    out: Path | None = None,
    count: int | None = None,
    seed: int = 0,
    mode: str | None = None,
) -> SweepResult:
    """Run (or continue) a sweep into ``out`` (an existing sweep folder continues)."""
    if count is not None and count < 1:
        raise RunError(f"--count {count}: give at least 1 trial")
    base = load_recipe(recipe_file, overrides, {"wandb.mode": mode} if mode else None)  # checks --wandb too
    sweep = load_sweep(sweep_file, base)
    set_keys = {parse_override(o)[0] for o in overrides}
    clash = sorted(set_keys & set(sweep.parameters))
    if clash:
        raise RecipeError(f"--set {clash[0]}: also a parameter of {sweep_file}; drop one of them")
    actual, reason = effective_mode(base.wandb.mode)
    if sweep.method == "bayes" and actual != "online":
        plan(sweep, count, seed)  # raises the one-line bayes error
    out = out or default_out(base, sweep)
    out.mkdir(parents=True, exist_ok=True)
    run = SweepRun(sweep, recipe_file, overrides, out, actual, sweep.name or out.name)
    if actual == "online":
        return SweepResult(out, sweep, _run_online(run, base, count), False)
    if reason is not None:
        log.warning("wandb: %s; the sweep runs locally with offline runs (upload later with `wandb sync`)", reason)
    _claim(run, base, seed)
    trials = plan(sweep, count, seed)
    with StopAfterTrial() as stop:
        for i, params in enumerate(trials):
            name = f"trial-{i:03d}"
            path = out / "trials" / name / TRIAL_FILE
            earlier = json.loads(path.read_text()) if path.is_file() else None
            if earlier is not None and earlier["status"] in DONE:
                if earlier["params"] != params:
                    raise RunError(f"{path}: parameters differ from the sweep's trial {i}; choose another --out")
                log.info("trial %s: already %s, kept", name, earlier["status"])
                continue
            if stop.requested:
                break
            try:
                run.run_trial(name, params, index=i)
            finally:
                write_table(run)
    done = sum(r["status"] in DONE for r in run.records())
    return SweepResult(out, sweep, write_table(run), stop.requested and done < len(trials))


def _run_online(run: SweepRun, base: Recipe, count: int | None) -> list[dict[str, Any]]:
    """W&B runs the search; each trial the agent hands out trains in ``trials/trial-<run id>``."""
    import wandb

    project = run.sweep.raw.get("project") or base.wandb.project
    entity = run.sweep.raw.get("entity") or base.wandb.entity
    path = run.out / STATE_FILE
    earlier = json.loads(path.read_text()) if path.is_file() else None
    if earlier is not None and (earlier.get("sweep") != run.sweep.raw or "sweep_id" not in earlier):
        raise RunError(f"{run.out}: holds a different or an offline sweep; choose another --out for this online one")
    if earlier is not None:  # the same command again: more agents on the same W&B sweep
        sweep_id, run.group = earlier["sweep_id"], earlier["group"]
    else:
        config = {k: v for k, v in run.sweep.raw.items() if k not in ("program", "command")}
        sweep_id = wandb.sweep(config, entity=entity, project=project)
        state = {"sweep": run.sweep.raw, "sweep_id": sweep_id, "group": run.group}
        atomic_write_text(path, json.dumps(state, indent=2))

    wandb.agent(
        sweep_id, function=lambda: agent_trial(run), entity=entity, project=project, count=count or run.sweep.run_cap
    )
    return write_table(run)


def agent_trial(run: SweepRun) -> dict[str, Any]:
    """One trial handed out by ``wandb.agent``: it names the run id (``WANDB_RUN_ID``, which
    ``wandb.init`` then adopts) and the parameters file (``WANDB_SWEEP_PARAM_PATH``)."""
    import wandb

    params = agent_parameters(os.environ[wandb.env.SWEEP_PARAM_PATH])
    record = run.run_trial(f"trial-{os.environ[wandb.env.RUN_ID]}", params)
    write_table(run)
    return record
