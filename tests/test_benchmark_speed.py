"""scripts/benchmark_speed.py runs every section on the tiny foundation (a smoke test of the script
itself; the figures in docs/performance.md come from the real run on ../shared)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_speed.py"


def load_script():
    # By path: the mace-torch wheel installs a top-level `scripts` package that would shadow ours.
    spec = importlib.util.spec_from_file_location("benchmark_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_every_section_runs_and_writes_json_and_markdown(tmp_path, tiny_model_file, two_fidelity_files):
    bench = load_script()
    out = tmp_path / "speed"
    args = ["--out", str(out), "--foundation", str(tiny_model_file), "--data", str(two_fidelity_files["train"])]
    args += ["--low", "lo", "--high", "hi", "--subset", "8", "--repeats", "2", "--batch-size", "4"]
    args += ["--molecules", "3", "--no-rss", "--sections", "1,3,4"]
    assert bench.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["sections"]) == {"1", "3", "4"}
    overhead = results["sections"]["1"]
    epochs = overhead["epochs"]
    assert all(e["n"] == 2 and e["min"] > 0 for e in epochs.values())
    one, two = (e["median"] for e in epochs.values())
    assert overhead["wall_ratio_two_over_one"]["ratio_of_medians"] == pytest.approx(two / one)
    wall = overhead["wall_ratio_two_over_one"]
    assert wall["min"] <= wall["median"] <= wall["max"] and wall["n"] == 2
    shares = results["sections"]["3"]["loader_share"]
    assert all(0 < s["median"] < 1 for s in shares.values())
    inference = results["sections"]["4"]
    assert all(r["median"] > 0 for r in inference["rates"].values())
    assert inference["peak_rss"] is None  # --no-rss: the `mace-mf train` child is the slow part
    text = (out / "results.md").read_text()
    assert "## 1. Fidelity overhead" in text and "## 4. Inference" in text


def test_against_upstream_times_both_tools_from_their_own_logs(tmp_path, tiny_model_file, two_fidelity_files):
    bench = load_script()
    out = tmp_path / "speed"
    args = ["--out", str(out), "--foundation", str(tiny_model_file), "--data", str(two_fidelity_files["train"])]
    args += ["--low", "lo", "--high", "hi", "--subset", "8", "--batch-size", "4", "--sections", "2"]
    args += ["--upstream-epochs", "2", "--upstream-repeats", "1"]
    assert bench.main(args) == 0
    section = json.loads((out / "results.json").read_text())["sections"]["2"]
    for tool in ("mace_mf", "upstream"):
        (run,) = section["runs"][tool]
        assert len(run["epoch_s"]) == 1 and run["epoch_s"][0] > 0  # epoch 1; epoch 0 holds the set-up
        assert 0 < run["first_epoch_s"] < run["wall_s"] and run["cpu_s"] > 0
    ratio = section["epoch_ratio_mace_mf_over_upstream"]
    expected = section["runs"]["mace_mf"][0]["epoch_s"][0] / section["runs"]["upstream"][0]["epoch_s"][0]
    assert ratio["median"] == pytest.approx(expected)
    assert "mace.cli.run_train" in section["runs"]["upstream"][0]["command"]


def test_missing_shared_files_skip_with_a_reason(tmp_path, capsys):
    bench = load_script()
    assert bench.main(["--out", str(tmp_path / "o"), "--foundation", str(tmp_path / "none.model")]) == 0
    assert "skipped: --foundation" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()
    assert bench.main(["--out", str(tmp_path / "o"), "--sections", "9"]) == 2
