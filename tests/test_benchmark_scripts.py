"""The benchmark scripts run end to end on the tiny foundation (smoke tests of the scripts themselves;
the figures in docs/benchmarks.md and docs/performance.md come from the real runs)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import ase.io
import pytest
from support import write_recipe

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    # By path: the mace-torch wheel installs a top-level `scripts` package that would shadow ours.
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_verdict_script_hides_forces_decides_on_pairs_and_checks_itself(tmp_path, tiny_model_file, two_fidelity_files):
    verdict = load("benchmark_verdict")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    ds = verdict.Dataset("tiny", recipe, None, (), two_fidelity_files["valid"], 16)
    args = argparse.Namespace(out=tmp_path / "verdict", arms="sf-high-e,mf,sf-low", seeds="0", pairs=None, workers=1)
    result = verdict.run_dataset(ds, args)
    hidden = ase.io.read(tmp_path / "verdict" / "tiny" / "data" / "valid.xyz", ":")
    assert all("hi_forces" not in a.arrays for a in hidden) and all("lo_forces" in a.arrays for a in hidden)
    assert result["projected"] and result["pairs"] == 16
    decision = result["decision"]
    assert decision["basis"] == "pairs" and set(decision["values"]) == {"sf-high-e", "mf"}  # sf-low: no recipe
    # projected pair energies: the estimate samples the true valid forces, so it is close to them
    for arm, ratio in result["estimate_over_true"].items():
        assert 0.5 < ratio < 1.5, arm
    assert result["right"] == (result["test_f_rmse"][decision["best"]] <= 1.05 * min(result["test_f_rmse"].values()))
    assert [row["pairs"] for row in result["cost"]] == [5, 10]
    assert "## tiny" in verdict.markdown({"tiny": result})


def test_selection_script_compares_chosen_with_random_subsets():
    selection = load("benchmark_selection")
    row = {"test/f_rmse_meV_A": 100.0, "test/f_rmse_meV_A_std": 1.0, "test/e_rmse_meV_atom": 10.0}
    summary = {
        "mf@0.2": {**row, "test/e_rmse_meV_atom_std": 0.5},
        "mf-fps@0.2": {**row, "test/f_rmse_meV_A": 90.0, "test/e_rmse_meV_atom": 9.0, "test/e_rmse_meV_atom_std": 0.2},
        "mf-disagreement@0.2": {**row, "test/f_rmse_meV_A": 95.0, "test/e_rmse_meV_atom": 11.0},
    }
    summary["mf-disagreement@0.2"]["test/e_rmse_meV_atom_std"] = 0.1
    rows = selection.compare(summary, [0.2, 0.05], ["fps", "disagreement"])
    assert [(r["method"], r["beats random"]) for r in rows] == [("fps", True), ("disagreement", False)]
    text = selection.markdown({"timing": None, "datasets": {"x": rows}})
    assert "| 20% | `fps` | 100 ± 1 | 90 ± 1 | 10.0 ± 0.5 | 9.0 ± 0.2 | yes |" in text


def test_crossover_script_finds_where_energies_alone_overtake_and_scores_the_pick():
    crossover = load("benchmark_crossover")
    arms = ["sf-high-e", "mf", "mf-low0.1"]

    def row(energies, eo, mf, low, chosen):
        test = {"sf-high-e": eo, "mf": mf, "mf-low0.1": low}
        better_end = min(eo, mf)
        return {
            "fraction": energies / 100,
            "energies": energies,
            "test_f_rmse": test,
            "test_f_rmse_std": dict.fromkeys(arms, 1.0),
            "chosen": chosen,
            "resolved": True,
            "never_loses": test[chosen] <= 1.05 * better_end,
            "chosen_gain_over_better_end": 1 - test[chosen] / better_end,
        }

    rows = [row(5, 500, 300, 310, "mf"), row(20, 300, 300, 250, "mf-low0.1"), row(100, 100, 300, 150, "mf")]
    rows.append(row(200, 90, 300, 150, "sf-high-e"))
    # energies alone are worse at 5, equal at 20 (the crossover), better at 100
    assert crossover.crossover(rows) == pytest.approx(20.0)
    assert crossover.crossover(rows[:1]) is None
    text = crossover.markdown({"x": {"high": "hi", "seeds": [0], "rows": rows, "crossover_energies": 20.0}}, arms)
    assert "energies alone overtake `mf` at about 20 hi energies" in text
    assert "| 20 (20%) | 300 ± 1 | 300 ± 1 | 250 ± 1 | `mf-low0.1` | yes | -17 % |" in text
    assert "| 100 (100%) | 100 ± 1 | 300 ± 1 | 150 ± 1 | `mf` | NO | +200 % |" in text
    assert "| 200 (200%) | 90 ± 1 | 300 ± 1 | 150 ± 1 | `sf-high-e` | yes | 0 % |" in text


@pytest.mark.parametrize(
    "name",
    [
        "benchmark_verdict",
        "benchmark_selection",
        "benchmark_seed_regime",
        "make_seed_regime_data",
        "make_correlated_data",
        "benchmark_crossover",
        "benchmark_scale",
        "gpu_check",
    ],
)
def test_scripts_explain_themselves(name, capsys):
    module = load(name)
    sys.argv = [name, "--help"]
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out


def test_scale_script_converts_and_finds_its_store_again(tmp_path, tiny_model_file, two_fidelity_files):
    """The scale benchmark's conversion and rerun sections on the tiny foundation and a few hundred
    geometries (its other sections train more and are covered by tests/test_store.py): the rerun's
    second run finds the store its first run made."""
    import subprocess

    args = [
        "--out", str(tmp_path / "scale"), "--data", str(two_fidelity_files["train"]),
        "--valid", str(two_fidelity_files["valid"]), "--foundation", str(tiny_model_file),
        "--low", "lo", "--high", "hi", "--geometries", "300", "--large", "200", "--repeats", "1",
        "--dtype", "float64", "--sections", "preprocess,rerun",
    ]  # fmt: skip
    subprocess.run([sys.executable, str(SCRIPTS / "benchmark_scale.py"), *args], check=True, capture_output=True)
    results = json.loads((tmp_path / "scale" / "results.json").read_text())
    assert results["sections"]["preprocess"]["workers_2"]["geometries_per_s_per_core"] > 0
    logs = [(tmp_path / "scale" / f"rerun-{attempt}" / "train.log").read_text() for attempt in ("first", "second")]
    assert "converting to a store" in logs[0] and "converting to a store" not in logs[1]  # found by content
    assert "## rerun" in (tmp_path / "scale" / "results.md").read_text()


def test_gpu_check_runs_on_the_cpu_quick(tmp_path, tiny_model_file, two_fidelity_files):
    """`scripts/gpu_check.py --device cpu --quick`: every section but upstream runs and reports, so the
    script a GPU session runs in one call cannot rot between GPU sessions."""
    gpu_check = load("gpu_check")
    args = ["--out", str(tmp_path / "gpu"), "--device", "cpu", "--quick", "--foundation", str(tiny_model_file),
            "--data", str(two_fidelity_files["train"]), "--low", "lo", "--high", "hi", "--threads", "1"]  # fmt: skip
    assert gpu_check.main(args) == 0
    results = json.loads((tmp_path / "gpu" / "results.json").read_text())
    assert set(results["sections"]) == {"agreement", "speed", "fidelities", "loading"}
    agreement = results["sections"]["agreement"]
    assert agreement["device_float64"]["energy_max_relative"] == 0.0  # the CPU against itself
    assert 0 < agreement["device_float32"]["energy_max_relative"] < 1e-5
    speed = results["sections"]["speed"]
    assert speed["e3nn-float32"]["step_ms"] > 0 and speed["e3nn-float32"]["floor_ms"] > 0
    assert "## speed" in (tmp_path / "gpu" / "results.md").read_text()
