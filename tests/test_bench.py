"""The benchmark arms and coupled heads end to end, on the tiny foundation."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from support import write_recipe
from test_run import stock_eval

from mace_mf.config.loading import load_recipe
from mace_mf.errors import RunError
from mace_mf.workflows.bench import low_scaled_arms, recommendation, run_benchmark, standard_arms
from mace_mf.workflows.run import train_run
from mace_mf.workflows.transfer import second_stage


def test_bench_scores_arms_and_never_reruns_finished_ones(tmp_path, tiny_model_file, two_fidelity_files):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    out = tmp_path / "bench"
    fraction_arms = ["sf-high-e", "mf-transfer"]
    args = (recipe, out, ["sf-high-e", "sf-high-ef", "mf-delta"], [0], [1.0, 0.5], fraction_arms, [])
    result = run_benchmark(*args, workers=2)  # two runs at a time, in spawned processes
    summary = result["summary"]
    at_half = {"sf-high-e@0.5", "mf@0.5", "mf-transfer@0.5"}  # mf: where the transfer starts
    assert set(summary) == {"sf-high-e", "sf-high-ef", "mf-delta", *at_half}
    transfer = load_recipe(out / "mf-transfer" / "seed0" / "frac0.5" / "recipe.resolved.yaml")
    assert Path(transfer.foundation.model) == (out / "mf" / "seed0" / "frac0.5" / "models" / "hi.model").resolve()
    assert transfer.fidelities["lo"].forces_weight == 0 and transfer.fidelities["hi"].label_fraction == 0.5
    # a decision at each fraction, among that fraction's arms, on the validation forces here
    decided = result["fraction_decisions"]["0.5"]
    assert decided["basis"] == "forces" and set(decided["values"]) == {"sf-high-e", "mf", "mf-transfer"}
    assert (
        f"With 50% of the hi energies: best on validation hi forces: {decided['best']}"
        in (out / "results.md").read_text()
    )
    assert summary["sf-high-e"]["valid/closure"] == pytest.approx(0.0)
    assert summary["sf-high-ef"]["valid/closure"] == pytest.approx(1.0)
    eo, oracle, delta = (summary[k]["test/f_rmse_meV_A"] for k in ("sf-high-e", "sf-high-ef", "mf-delta"))
    assert summary["mf-delta"]["test/closure"] == pytest.approx((eo - delta) / (eo - oracle))
    # the oracle trained on hi forces; the energy-only arm did not (its resolved recipe says so)
    resolved = load_recipe(out / "sf-high-e" / "seed0" / "recipe.resolved.yaml")
    assert resolved.fidelities["hi"].forces_weight == 0 and resolved.fidelities["lo"].forces_weight == 0
    assert load_recipe(out / "sf-high-ef" / "seed0" / "recipe.resolved.yaml").fidelities["hi"].forces_weight > 0
    frac = load_recipe(out / "mf" / "seed0" / "frac0.5" / "recipe.resolved.yaml")
    assert frac.fidelities["hi"].label_fraction == 0.5 and frac.fidelities["lo"].forces_weight == 10.0
    assert "multi-fidelity" in result["verdict"]
    # the lo force labels scored against the hi ones, straight from the test file
    frames = ase.io.read(two_fidelity_files["test"], ":")
    diff = np.concatenate([a.arrays["lo_forces"] - a.arrays["hi_forces"] for a in frames])
    gap = result["label_gap"]["test"]
    assert gap["f_rmse_meV_A"] == pytest.approx(1000 * np.sqrt(np.mean(diff**2)))
    assert gap["configs"] == len(frames)
    assert "lo force labels scored as a model of hi" in (out / "results.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("run.json")}
    assert len(stamps) == 6
    again = run_benchmark(*args)  # one process: same runs, nothing retrained
    assert {p: p.stat().st_mtime_ns for p in out.rglob("run.json")} == stamps
    assert again["summary"] == summary
    assert (out / "results.md").read_text().startswith("| arm |")
    assert again["label_gap"] == result["label_gap"]
    assert (out / "learning_curve.png").stat().st_size > 0
    # a finished arm trained with other settings is named, never passed off as this run
    with pytest.raises(RunError, match=r"sf-high-e/seed0: finished with a different recipe \(training.lr: "):
        run_benchmark(*args[:-1], ["training.lr=0.5"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("run.json")} == stamps


def test_delta_run_exports_files_that_reproduce_its_metrics(tmp_path, tiny_model_file, two_fidelity_files):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    recipe = load_recipe(recipe_file, ["fidelities.hi.base=lo", "fidelities.hi.coupling=delta"])
    run = train_run(recipe, tmp_path / "run", recipe_file)
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    test = two_fidelity_files["test"]
    single, multi = stock_eval(
        (run / "models" / "hi.model", test, "hi", {}),
        (run / "models" / "multihead.model", test, "hi", {"head": "hi"}),
    )
    for result in (single, multi):
        assert result["f_rmse"] == pytest.approx(metrics["hi"]["f_rmse_meV_A"], rel=1e-6)
        assert result["e_rmse"] == pytest.approx(metrics["hi"]["e_rmse_meV_atom"], rel=1e-6)


def test_every_arm_resolves_to_the_recipe_it_describes(tmp_path, tiny_model_file, two_fidelity_files):
    """Each arm's overrides are valid recipe keys, and the resolved recipe trains what the arm says."""
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files)
    arms = standard_arms(load_recipe(recipe_file), "lo", "hi")
    got = {name: load_recipe(recipe_file, list(arm.overrides)) for name, arm in arms.items()}
    hi = {name: r.fidelities["hi"] for name, r in got.items()}
    lo = {name: r.fidelities["lo"] for name, r in got.items()}
    assert got["zero-shot"].training.epochs == 0
    assert hi["sf-high-e"].forces_weight == 0 and lo["sf-high-e"].energy_weight == lo["sf-high-e"].forces_weight == 0
    assert hi["sf-high-ef"].forces_weight > 0 and hi["sf-high-ef"].base is None
    assert hi["sf-low"].energy_weight == 0 and (hi["sf-low"].coupling, hi["sf-low"].coupling_strength) == ("delta", 0)
    assert (hi["mf"].coupling, hi["mf"].coupling_strength) == ("tied", 1.0)  # the default, resolved
    assert got["mf-tied"] == got["mf"]  # so the default's figures are the tied arm's
    assert hi["mf-independent"].coupling == "independent" and hi["mf-independent"].base is None
    assert (hi["mf-delta"].coupling, hi["mf-delta"].base) == ("delta", "lo")
    assert hi["mf-prior"].base_forces_weight > 0 and hi["mf-prior"].coupling == "independent"
    assert got["mf-embedding"].training.fidelity_embedding and hi["mf-embedding"].coupling == "tied"
    assert got["mf-normalised"].training.normalise_weights
    assert got["mf-warmup"].training.freeze_backbone_epochs == 1
    scaled = low_scaled_arms(["mf", "mf-low0.3", "mf-low1e-2", "mf-lowx"], got["mf"], "lo", "hi")
    assert set(scaled) == {"mf-low0.3", "mf-low1e-2"}
    lowered = load_recipe(recipe_file, list(scaled["mf-low1e-2"].overrides))
    assert lowered.fidelities["lo"].energy_weight == pytest.approx(0.01 * lo["mf"].energy_weight)
    assert lowered.fidelities["lo"].forces_weight == pytest.approx(0.01 * lo["mf"].forces_weight)
    assert lowered.fidelities["hi"].coupling_strength == pytest.approx(0.01 * hi["mf"].coupling_strength)
    assert lowered.fidelities["hi"].coupling == hi["mf"].coupling == "tied"
    assert arms["mace-mh"].runner == "mace_run_train" and got["mace-mh"] == got["mf"]
    # the transfer arm is the recipe with its key; bench trains its second stage from the mf arm's model
    assert arms["mf-transfer"].start_from == "mf" and got["mf-transfer"].transfer.enabled
    stage = second_stage(got["mf-transfer"], tiny_model_file)
    assert stage.fidelities == got["sf-high-e"].fidelities and stage.foundation == got["sf-high-e"].foundation
    assert "mace-mf train" in recommendation(arms["mf-transfer"], recipe_file, tmp_path, [])
    assert load_recipe(tmp_path / "recommended.yaml").transfer.enabled  # one run that does both stages
    assert (hi["mf-fps"].label_selection, hi["mf-disagreement"].label_selection) == ("fps", "disagreement")
    assert (
        hi["mf"].label_selection == "random"
        and got["mf-fps"].model_copy(update={"fidelities": got["mf"].fidelities}) == got["mf"]
    )  # nothing else differs from the recipe
