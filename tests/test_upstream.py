"""The upstream arm (`mace-mh`): the real `mace_run_train` on a recipe, scored by mace_mf's evaluation."""

from __future__ import annotations

import json
import math
from datetime import datetime

import ase.io
import pytest
from support import write_recipe
from test_run import stock_eval

from mace_mf.workflows.bench import run_benchmark
from mace_mf.workflows.upstream import parse_timings


def _logged_valid_errors(log_text: str, epoch: int) -> dict[str, tuple[float, str]]:
    """Upstream's own validation RMSEs (energy per atom, forces) per head after ``epoch``."""
    found = {}
    for line in log_text.splitlines():
        if f"Epoch {epoch}: head: " in line:
            head = line.split("head: ")[1].split(",")[0]
            e = float(line.split("RMSE_E_per_atom=")[1].split("meV")[0])
            f = line.split("RMSE_F=")[1].split("meV")[0].strip()
            found[head] = (e, f)
    return found


def test_upstream_arm_trains_with_mace_run_train_and_is_scored_like_stock_mace(
    tmp_path, tiny_model_file, two_fidelity_files
):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    out = tmp_path / "bench"
    args = (recipe, out, ["mace-mh"], [0], [1.0], [], ["num_threads=1"])
    result = run_benchmark(*args)
    run = out / "mace-mh" / "seed0"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and record["runner"] == "mace_run_train"
    upstream = record["upstream"]
    assert "--multiheads_finetuning=False" in upstream["command"] and "--ema" in upstream["command"]
    assert upstream["heads"] == ["lo", "hi"]  # the target last: upstream selects on the last head
    assert len(upstream["epoch_s"]) == 1 and upstream["setup_s"] > 0 and upstream["epoch_s"][0] > 0

    # Each head's files carry the recipe's weights; hi forces (weight 0) are never given to upstream.
    lo = ase.io.read(run / "upstream" / "heads" / "lo_train.xyz", ":")
    hi = ase.io.read(run / "upstream" / "heads" / "hi_train.xyz", ":")
    assert len(lo) == len(hi) == 24
    assert lo[0].info["config_forces_weight"] == 10.0 and lo[0].info["config_energy_weight"] == 1.0
    assert hi[0].info["config_energy_weight"] == 10.0 and "REF_forces" not in hi[0].arrays

    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("train", "valid", "test"):
        for fidelity in ("lo", "hi"):
            m = metrics[split][fidelity]
            assert all(math.isfinite(m[k]) for k in ("e_rmse_meV_atom", "f_rmse_meV_A", "f_mae_meV_A"))
    # Our scoring of the final model reproduces upstream's own validation figures of the chosen epoch...
    logged = _logged_valid_errors((run / "upstream" / "logs" / "mace_mh_run-0.log").read_text(), 0)
    assert logged["hi"][0] == pytest.approx(metrics["valid"]["hi"]["e_rmse_meV_atom"], abs=0.01)
    assert logged["hi"][1] == "None"  # no hi forces in its validation loss either
    assert logged["lo"][0] == pytest.approx(metrics["valid"]["lo"]["e_rmse_meV_atom"], abs=0.01)
    assert float(logged["lo"][1]) == pytest.approx(metrics["valid"]["lo"]["f_rmse_meV_A"], abs=0.01)
    # ...and stock MACECalculator's, per head, on the test split.
    test = two_fidelity_files["test"]
    model = run / "upstream" / "mace_mh.model"
    hi_stock, lo_stock = stock_eval((model, test, "hi", {"head": "hi"}), (model, test, "lo", {"head": "lo"}))
    for fidelity, stock in (("hi", hi_stock), ("lo", lo_stock)):
        assert stock["f_rmse"] == pytest.approx(metrics["test"][fidelity]["f_rmse_meV_A"], rel=1e-6)
        assert stock["e_rmse"] == pytest.approx(metrics["test"][fidelity]["e_rmse_meV_atom"], rel=1e-6)
    assert hi_stock["forces0"] != lo_stock["forces0"]  # two heads really trained apart

    assert result["summary"]["mace-mh"]["test/f_rmse_meV_A"] == pytest.approx(metrics["test"]["hi"]["f_rmse_meV_A"])
    stamp = (run / "run.json").stat().st_mtime_ns
    run_benchmark(*args)
    assert (run / "run.json").stat().st_mtime_ns == stamp  # finished: not rerun


def test_upstream_epoch_times_are_read_from_its_log():
    log = "\n".join(
        [
            "2026-11-28 10:00:05.000 INFO: Initial: head: pm6, loss=1.0, RMSE_E_per_atom= 1.00 meV, RMSE_F= 2.00",
            "2026-11-28 10:00:06.500 INFO: Initial: head: dft, loss=1.0, RMSE_E_per_atom= 1.00 meV, RMSE_F=None",
            "2026-11-28 10:00:30.000 INFO: Epoch 0: head: pm6, loss=1.0, RMSE_E_per_atom= 1.00 meV, RMSE_F= 2.00",
            "2026-11-28 10:00:36.500 INFO: Epoch 0: head: dft, loss=1.0, RMSE_E_per_atom= 1.00 meV, RMSE_F=None",
            "2026-11-28 10:01:00.000 INFO: Epoch 1: head: dft, loss=1.0, RMSE_E_per_atom= 1.00 meV, RMSE_F=None",
        ]
    )
    setup, epochs = parse_timings(log, "dft", datetime(2026, 11, 28, 10, 0, 0))
    assert setup == pytest.approx(6.5)
    assert epochs == pytest.approx([30.0, 23.5])
