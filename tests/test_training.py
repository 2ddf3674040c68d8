"""Training options do what the recipe says: freezing, LR factors, dtype, splits, E0s, heads."""

from __future__ import annotations

import json

import pytest
import torch
from support import build_tiny_mace, write_recipe

from mace_mf.config.loading import load_recipe
from mace_mf.errors import FoundationError, RecipeError
from mace_mf.model.heads import replicate_head
from mace_mf.workflows.run import train_run


def run(tmp_path, foundation, files, *overrides, epochs=1):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe_file = write_recipe(tmp_path / "recipe.yaml", foundation, files, epochs=epochs)
    return train_run(load_recipe(recipe_file, list(overrides)), tmp_path / "out")


def load(out, name="multihead.model"):
    return torch.load(out / "models" / name, weights_only=False, map_location="cpu")


def blocks_equal(a, b, prefix):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


def test_heads_only_warm_up_leaves_the_backbone_untouched(tmp_path, tiny_model_file, two_fidelity_files):
    out = run(tmp_path, tiny_model_file, two_fidelity_files, "training.freeze_backbone_epochs=1")
    trained, foundation = load(out), torch.load(tiny_model_file, weights_only=False)
    for prefix in ("interactions.", "products.", "node_embedding."):
        assert blocks_equal(trained, foundation, prefix), prefix
    history = json.loads((out / "history.json").read_text())
    assert history["epochs"][0]["frozen_backbone"] is True
    start = replicate_head(foundation, ["lo", "hi"])
    assert not blocks_equal(trained, start, "readouts.")


def test_lr_factor_zero_freezes_a_block_and_others_train(tmp_path, tiny_model_file, two_fidelity_files):
    out = run(tmp_path, tiny_model_file, two_fidelity_files, "training.lr_factors={embedding: 0.0, products: 0.5}")
    trained, foundation = load(out), torch.load(tiny_model_file, weights_only=False)
    assert blocks_equal(trained, foundation, "node_embedding.")
    assert not blocks_equal(trained, foundation, "interactions.")
    lrs = json.loads((out / "history.json").read_text())["epochs"][0]["lr"]
    assert "embedding" not in lrs and lrs["products"] == pytest.approx(0.5 * lrs["interactions"])


def test_float32_run_exports_float32_models(tmp_path, tiny_model_file, two_fidelity_files):
    out = run(tmp_path, tiny_model_file, two_fidelity_files, "dtype=float32")
    assert next(load(out, "hi.model").parameters()).dtype == torch.float32
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["hi"]["f_rmse_meV_A"] > 0


def test_validation_split_off_by_fraction_when_no_file(tmp_path, tiny_model_file, two_fidelity_files):
    files = {"train": two_fidelity_files["train"]}
    out = run(tmp_path, tiny_model_file, files, "data.valid_fraction=0.25", "data.test_fraction=0.25", epochs=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["valid"]["hi"]["n_e"] == 6 and metrics["test"]["hi"]["n_e"] == 6
    assert metrics["train"]["hi"]["n_e"] == 12


def test_given_e0s_are_used_and_incomplete_ones_refused(tmp_path, tiny_model_file, two_fidelity_files):
    e0s = "fidelities.hi.e0s={H: -1.0, C: -2.0, N: -3.0, O: -4.0}"
    out = run(tmp_path, tiny_model_file, two_fidelity_files, e0s, epochs=0)
    energies = load(out, "hi.model").atomic_energies_fn.atomic_energies.flatten().tolist()
    assert energies == [-1.0, -2.0, -3.0, -4.0]
    with pytest.raises(RecipeError, match="no value for O"):
        run(tmp_path / "b", tiny_model_file, two_fidelity_files, "fidelities.hi.e0s={H: -1.0, C: -2.0, N: -3.0}")


def test_multi_head_foundation_needs_a_chosen_head(tmp_path, two_fidelity_files):
    path = tmp_path / "two_heads.model"
    torch.save(replicate_head(build_tiny_mace(), ["pbe", "r2scan"]), path)
    with pytest.raises(FoundationError, match="has heads \\['pbe', 'r2scan'\\]; choose the starting head"):
        run(tmp_path / "a", path, two_fidelity_files, epochs=0)
    with pytest.raises(FoundationError, match="'wb97x' is not a head"):
        run(tmp_path / "b", path, two_fidelity_files, "foundation.head=wb97x", epochs=0)
    out = run(tmp_path / "c", path, two_fidelity_files, "foundation.head=r2scan", epochs=0)
    assert load(out).heads == ["hi", "lo"]  # the multi-head export: the target first


def test_the_thread_default_shares_the_cores_and_leaves_busy_ones_alone(monkeypatch, tmp_path):
    from mace_mf.train import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "SAMPLE_INTERVAL_S", 0.0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    loadavg = tmp_path / "loadavg"
    monkeypatch.setattr(threads, "PROC_LOADAVG", loadavg)
    # The one-minute average (first field) is high in every case: the work that just finished
    # must not count; the runnable tasks now (fourth field, this process included) do.
    cases = [(1, None, 4), (1, "2", 2), (4, None, 1), (3, None, 2), (10, "2", 1)]
    for running, runs, expected in cases:
        loadavg.write_text(f"3.50 2.00 1.00 {running}/180 4242\n")
        if runs is None:
            monkeypatch.delenv(threads.RUNS_ENV, raising=False)
        else:
            monkeypatch.setenv(threads.RUNS_ENV, runs)
        assert threads.default_threads()[0] == expected, (running, runs)
    # Without /proc (macOS), the load average stands in.
    monkeypatch.setattr(threads, "PROC_LOADAVG", tmp_path / "absent")
    monkeypatch.delenv(threads.RUNS_ENV, raising=False)
    for load, expected in [(0.1, 4), (2.6, 1)]:
        monkeypatch.setattr(threads.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert threads.default_threads()[0] == expected, load
