"""Sweeps from a W&B sweep file: planning, validation, and local runs read back from their files."""

from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest
import yaml
from support import ROOT, write_recipe
from wandb_records import of_type, read_records, run_config, summary_of

from mace_mf.cli import main
from mace_mf.config.loading import load_recipe
from mace_mf.errors import RecipeError
from mace_mf.workflows.sweep import SweepRun, agent_trial, load_sweep, plan, ranked, run_sweep


def sweep_file(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_file, two_fidelity_files):
    return write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)


CHEAP = ["data.test=null", "export.multihead=false", "export.fidelities=[hi]"]
GRID = """
    method: grid
    metric: {name: valid/hi/f_rmse_meV_A, goal: minimize}
    parameters:
      training.lr: {values: [0.001, 0.005]}
      fidelities.lo.forces_weight: {values: [1.0, 10.0]}
    """


def test_grid_plan_is_the_product_in_file_order_and_count_cuts_it(tmp_path, tiny_recipe):
    sweep = load_sweep(sweep_file(tmp_path / "s.yaml", GRID), load_recipe(tiny_recipe))
    assert plan(sweep, None, 0) == [
        {"training.lr": 0.001, "fidelities.lo.forces_weight": 1.0},
        {"training.lr": 0.001, "fidelities.lo.forces_weight": 10.0},
        {"training.lr": 0.005, "fidelities.lo.forces_weight": 1.0},
        {"training.lr": 0.005, "fidelities.lo.forces_weight": 10.0},
    ]
    assert len(plan(sweep, 3, 0)) == 3


def test_random_plan_is_seeded_within_bounds_and_a_longer_count_extends_it(tmp_path, tiny_recipe):
    text = """
        method: random
        metric: {name: final/valid/hi/e_rmse_meV_atom}
        parameters:
          training.lr: {distribution: log_uniform_values, min: 0.0001, max: 0.01}
          training.batch_size: {min: 2, max: 8}
          fidelities.hi.energy_weight: {values: [1.0, 10.0, 100.0]}
        """
    sweep = load_sweep(sweep_file(tmp_path / "s.yaml", text), load_recipe(tiny_recipe))
    five, ten = plan(sweep, 5, seed=3), plan(sweep, 10, seed=3)
    assert ten[:5] == five and plan(sweep, 5, seed=4) != five
    assert all(1e-4 <= t["training.lr"] <= 1e-2 and t["training.batch_size"] in range(2, 9) for t in ten)
    assert all(isinstance(t["training.batch_size"], int) for t in ten)
    assert len({t["training.lr"] for t in ten}) == 10
    with pytest.raises(RecipeError, match="--count N or set run_cap"):
        plan(sweep, None, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("training.lr:", "training.learning_rate:"), "did you mean 'lr'"),
        (("fidelities.lo.", "fidelities.pm6."), "give a declared fidelity"),
        (("valid/hi/f_rmse_meV_A", "valid/hi/f_rmse"), "did you mean 'valid/hi/f_rmse_meV_A'"),
        (("method: grid", "method: hyperband"), "method: 'hyperband' is not one of"),
        (("{values: [0.001, 0.005]}", "{min: 0.001, max: 0.005}"), "grid search needs values"),
        (("    parameters:", "    early_stop: 3\n    parameters:"), "unknown key 'early_stop'"),
    ],
)
def test_sweep_file_errors_name_the_key_and_the_fix(tmp_path, tiny_recipe, change, message):
    path = sweep_file(tmp_path / "s.yaml", GRID.replace(*change))
    with pytest.raises(RecipeError, match=message) as info:
        load_sweep(path, load_recipe(tiny_recipe))
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_bayes_offline_and_set_clash_are_one_line_errors(tmp_path, tiny_recipe, capsys):
    bayes = sweep_file(tmp_path / "b.yaml", GRID.replace("method: grid", "method: bayes"))
    assert main(["sweep", str(tiny_recipe), str(bayes), "--wandb", "disabled", "--out", str(tmp_path / "b")]) == 2
    assert "method bayes needs the W&B server" in capsys.readouterr().err
    assert main(["sweep", str(tiny_recipe), str(bayes), "--wandb", "sometimes", "--out", str(tmp_path / "b")]) == 2
    assert "wandb.mode: Input should be 'online', 'offline' or 'disabled'" in capsys.readouterr().err
    grid = sweep_file(tmp_path / "g.yaml", GRID)
    with pytest.raises(RecipeError, match=r"--set training\.lr: also a parameter"):
        run_sweep(tiny_recipe, grid, ["training.lr=0.1"], tmp_path / "g", mode="disabled")
    assert not (tmp_path / "g").exists() and not (tmp_path / "b" / "trials").exists()


def test_shipped_sweeps_fit_their_recipes():
    quick = load_sweep(ROOT / "recipes" / "sweep_quickstart.yaml", load_recipe(ROOT / "recipes" / "quickstart.yaml"))
    trials = plan(quick, None, 0)
    assert len(trials) == 4 and len({(t["training.lr"], t["fidelities.xtb.forces_weight"]) for t in trials}) == 4
    pyseqm = load_sweep(ROOT / "recipes" / "sweep_pyseqm.yaml", load_recipe(ROOT / "recipes" / "pyseqm_mf.yaml"))
    assert len(plan(pyseqm, None, 0)) == 9 and pyseqm.metric == "valid/dft/f_rmse_meV_A"
    ethanol = load_sweep(ROOT / "recipes" / "sweep_ethanol.yaml", load_recipe(ROOT / "recipes" / "ethanol_mf.yaml"))
    weights = [t["fidelities.xtb.forces_weight"] for t in plan(ethanol, None, 0)]
    assert weights[0] == 0.0 and ethanol.metric == "valid/pbe/f_rmse_meV_A"  # the energy-only fallback is a trial


def test_ranking_follows_the_goal_and_puts_failures_last(tmp_path, tiny_recipe):
    sweep = load_sweep(sweep_file(tmp_path / "s.yaml", GRID), load_recipe(tiny_recipe))
    records = [
        {"trial": "a", "status": "complete", "metric": 2.0},
        {"trial": "b", "status": "failed", "metric": None},
        {"trial": "c", "status": "complete", "metric": 1.0},
        {"trial": "d", "status": "complete", "metric": None},
    ]
    assert [(r["trial"], r["rank"]) for r in ranked(records, sweep)] == [("c", 1), ("a", 2), ("d", None), ("b", None)]
    sweep.goal = "maximize"
    assert [r["trial"] for r in ranked(records, sweep)] == ["a", "c", "d", "b"]


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler for the test, the launcher's back afterwards: a test run started
    with SIGINT ignored (a script's background job, as CI may be) would never see the press."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c_during_export(monkeypatch, at_call):
    """Press Ctrl-C (SIGINT to this process) while the ``at_call``-th run exports its models."""
    from mace_mf.workflows import run as run_module

    original = run_module.export_models
    calls = []

    def export(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "export_models", export)
    return calls


def test_offline_grid_sweep_runs_four_trials_in_one_group_stops_on_ctrl_c_continues_and_ranks(
    tmp_path, tiny_recipe, wandb_env, monkeypatch, capsys, python_ctrl_c
):
    grid = sweep_file(tmp_path / "s.yaml", GRID)
    out = tmp_path / "sweep"
    # --set applies to every trial (here: no test split, one exported file, to keep the trials short)
    cheap = [arg for item in CHEAP for arg in ("--set", item)]
    args = ["sweep", str(tiny_recipe), str(grid), "--out", str(out), "--wandb", "offline", *cheap]
    calls = ctrl_c_during_export(monkeypatch, at_call=2)
    assert main(args) == 0
    assert f"sweep stopped early; continue it with the same command and --out {out}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the sweep's handler is gone
    first = json.loads((out / "trials.json").read_text())["trials"]
    assert sorted(t["trial"] for t in first) == ["trial-000", "trial-001"]  # trial-001 finished, then it stopped
    assert all(t["status"] == "complete" for t in first)
    done_at = {t["trial"]: (out / "trials" / t["trial"] / "trial.json").stat().st_mtime_ns for t in first}

    assert main(args) == 0  # the same command continues the sweep
    assert len(calls) == 4  # trials 000 and 001 were not rerun
    assert {t: (out / "trials" / t / "trial.json").stat().st_mtime_ns for t in done_at} == done_at
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert [t["rank"] for t in trials] == [1, 2, 3, 4] and all(t["status"] == "complete" for t in trials)
    metrics = [t["metric"] for t in trials]
    assert metrics == sorted(metrics)
    assert len(list(wandb_env.glob("wandb/offline-run-*/run-*.wandb"))) == 4
    configs = set()
    for trial in trials:
        folder = out / "trials" / trial["trial"]
        history = json.loads((folder / "history.json").read_text())["epochs"]
        assert set(json.loads((folder / "metrics.json").read_text())) == {"train", "valid"}
        assert trial["metric"] == min(r["valid"]["hi"]["f_rmse_meV_A"] for r in history)
        (run_file,) = wandb_env.glob(f"wandb/offline-run-*-{trial['wandb_id']}/run-*.wandb")
        records = read_records(run_file)
        (run,) = of_type(records, "run")
        assert run["run_group"] == "sweep" and run["display_name"] == f"sweep-{trial['trial']}"
        config = run_config(run)
        pair = (config["training"]["lr"], config["fidelities"]["lo"]["forces_weight"])
        assert pair == (trial["params"]["training.lr"], trial["params"]["fidelities.lo.forces_weight"])
        configs.add(pair)
        # the local ranking uses the number W&B holds as the run's best value of the metric
        assert summary_of(records)["valid/hi/f_rmse_meV_A"] == {"min": trial["metric"]}
    assert configs == {(lr, w) for lr in (0.001, 0.005) for w in (1.0, 10.0)}
    table = [line for line in (out / "trials.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 5 and table[1].startswith(f"| 1 | {trials[0]['trial']} | complete |")


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_recipe):
    # trial 0 fails inside its run (E0s given for H only, the data has C, N, O too)
    text = """
        method: grid
        metric: {name: final/valid/hi/e_rmse_meV_atom}
        parameters:
          fidelities.hi.e0s: {values: [{H: -13.6}, foundation]}
          training.epochs: {value: 0}
        """
    result = run_sweep(tiny_recipe, sweep_file(tmp_path / "s.yaml", text), CHEAP, tmp_path / "sweep", mode="disabled")
    assert not result.stopped
    assert [(t["trial"], t["status"], t["rank"]) for t in result.trials] == [
        ("trial-001", "complete", 1),
        ("trial-000", "failed", None),
    ]
    failed = result.trials[1]
    assert failed["error"].startswith("RecipeError") and "no value for C, N, O" in failed["error"]
    assert failed["params"] == {"fidelities.hi.e0s": {"H": -13.6}, "training.epochs": 0}
    assert "| failed |" in (tmp_path / "sweep" / "trials.md").read_text()
    resolved = yaml.safe_load((tmp_path / "sweep" / "trials" / "trial-001" / "recipe.resolved.yaml").read_text())
    assert resolved["fidelities"]["hi"]["e0s"] == "foundation" and resolved["export"]["multihead"] is False


def test_a_trial_from_the_wandb_agent_takes_its_run_id_and_parameters(tmp_path, tiny_recipe, wandb_env, monkeypatch):
    """What ``wandb.agent`` hands a trial (run id and parameter file in the environment), offline."""
    import wandb
    from wandb.sdk.lib import config_util

    params = tmp_path / "config-agent.yaml"
    config_util.save_config_file_from_dict(str(params), {"training.lr": {"value": 0.003}})
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    wandb.teardown()  # as the agent does after setting the environment, so that wandb.init reads it
    sweep = load_sweep(sweep_file(tmp_path / "s.yaml", GRID), load_recipe(tiny_recipe))
    run = SweepRun(sweep, tiny_recipe, [*CHEAP, "training.epochs=0"], tmp_path / "sweep", "offline", "g")
    record = agent_trial(run)
    assert record["status"] == "complete" and record["wandb_id"] == "agentrun1"
    assert record["params"] == {"training.lr": 0.003}
    (run_file,) = wandb_env.glob("wandb/offline-run-*-agentrun1/run-agentrun1.wandb")
    (run_record,) = of_type(read_records(run_file), "run")
    config = run_config(run_record)
    assert config["training"]["lr"] == 0.003 and run_record["run_group"] == "g"
    assert json.loads((tmp_path / "sweep" / "trials.json").read_text())["trials"][0]["trial"] == "trial-agentrun1"


def test_a_sweep_started_with_ctrl_c_ignored_keeps_ignoring_it():
    """``nohup mace-mf sweep ...`` (SIGINT ignored at start) must not be stoppable by a stray Ctrl-C."""
    from mace_mf.workflows.sweep import StopAfterTrial

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopAfterTrial():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with StopAfterTrial() as stop:
            assert signal.getsignal(signal.SIGINT) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
