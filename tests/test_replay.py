"""Replay against forgetting: the foundation's level as one more fidelity (mace_mf.workflows.replay),
and the forgetting report that measures how far fine-tuning moved it."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from support import write_recipe

from mace_mf.config.loading import load_recipe
from mace_mf.data.graphs import Batches
from mace_mf.errors import RecipeError
from mace_mf.workflows.replay import generated_pool, replay_recipe, small_molecules
from mace_mf.workflows.run import train_run


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory):
    """Rattled g2 molecules of H, C, N, O other than the fine-tuning data's: the replay domain."""
    frames = []
    for i, atoms in enumerate(a for a in small_molecules({1, 6, 7, 8}) if len(a) <= 8):
        for k in range(2):
            copy = atoms.copy()
            copy.rattle(0.05, seed=10 * i + k)
            copy.center(vacuum=5.0)
            frames.append(copy)
    path = tmp_path_factory.mktemp("pool") / "pool.xyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def _run(tmp_path, name, tiny_model_file, files, pool, md=False, extra=(), **replay):
    recipe_file = write_recipe(tmp_path / f"{name}.yaml", tiny_model_file, files, epochs=1)
    overrides = [f"replay.pool={pool}", "replay.budget=20", f"md_check.enabled={md}", "replay.md_check=2", *extra]
    overrides += [f"replay.{k}={v}" for k, v in replay.items()]
    out = train_run(load_recipe(recipe_file, overrides), tmp_path / name, recipe_file)
    read = lambda f: json.loads((out / f).read_text())  # noqa: E731
    return out, read("zero_shot_metrics.json"), read("metrics.json")


def test_replay_starts_at_the_foundation_and_holds_its_level(tmp_path, tiny_model_file, two_fidelity_files, pool_file):
    """The replay head is the foundation's readout with its E0s, so before training it reproduces the
    foundation's labels exactly; plain fine-tuning (replay weights 0: measured, not trained) moves
    the backbone and with it the foundation's level, and training on the replay labels moves it less."""
    files = {k: two_fidelity_files[k] for k in ("train", "valid", "test")}
    measured_out, zero_shot, measured = _run(
        tmp_path, "measured", tiny_model_file, files, pool_file, energy_weight=0, forces_weight=0
    )
    held = zero_shot["valid"]["replay"]
    assert held["n_f"] == 4 and held["f_rmse_meV_A"] < 1e-3 and held["e_rmse_meV_atom"] < 1e-3
    drift_without = measured["valid"]["replay"]["f_rmse_meV_A"]
    assert drift_without > 1.0  # meV/Å: fine-tuning moved the foundation's level
    assert measured["train"]["replay"]["f_rmse_meV_A"] is None  # measured only: no replay training cost
    assert "nothing replayed" in (measured_out / "report.md").read_text()
    assert not (measured_out / "forgetting.json").read_text().count('"target"')  # md_check off: no MD
    fine_tuning = measured["train"]["lo"]["n_e"]
    # data.max_train limits the fine-tuning data only: every trained replay geometry rides along
    cap = [f"data.max_train={fine_tuning}"]
    replay_out, _, replayed = _run(tmp_path, "replayed", tiny_model_file, files, pool_file, md=True, extra=cap)
    assert replayed["train"]["replay"]["n_f"] == 16 and replayed["train"]["lo"]["n_e"] == fine_tuning
    assert replayed["valid"]["replay"]["f_rmse_meV_A"] < drift_without
    forgetting = json.loads((replay_out / "forgetting.json").read_text())
    assert forgetting["replayed"] and forgetting["held_out"] == 4
    assert forgetting["drift"]["f_rmse_meV_A"] == replayed["valid"]["replay"]["f_rmse_meV_A"]
    for model in ("target", "foundation"):
        assert forgetting["md_check"][model]["structures"] == 2
        assert 0 <= forgetting["md_check"][model]["passed"] <= 2
    report = (replay_out / "report.md").read_text()
    assert "## Forgetting" in report and "On 4 held-out replay geometries" in report
    assert "MD beyond the fine-tuning data" in report
    # the target head is first in the multi-head file, the replay head is exported like any fidelity
    model = torch.load(replay_out / "models" / "multihead.model", weights_only=False)
    assert model.heads[0] == "hi" and "replay" in model.heads
    assert (replay_out / "models" / "replay.model").is_file()
    # the same choice and labels in both runs: cached, keyed by the foundation and the settings
    assert measured["valid"]["replay"]["n_f"] == replayed["valid"]["replay"]["n_f"]


def test_replay_geometries_ride_along_the_fine_tuning_batches():
    """``replay.ride_along``: as many steps as the fine-tuning geometries make alone, every replay
    geometry once per epoch, shared out evenly, in a permutation that changes with the seed."""
    riders = np.arange(30, 55)  # 25 replay geometries after 30 fine-tuning ones
    batches = list(Batches(55, 8, shuffle=True, seed=3, riders=riders))
    assert len(batches) == len(Batches(55, 8, shuffle=True, seed=3, riders=riders)) == 4  # ceil(30 / 8)
    drivers = [[i for i in b if i < 30] for b in batches]
    shares = [[i for i in b if i >= 30] for b in batches]
    assert [len(d) for d in drivers] == [8, 8, 8, 6]
    assert sorted(len(s) for s in shares) == [6, 6, 6, 7]
    assert sorted(i for b in batches for i in b) == list(range(55))
    other = list(Batches(55, 8, shuffle=True, seed=4, riders=riders))
    assert [i for b in other for i in b if i >= 30] != [i for s in shares for i in s]
    assert list(Batches(55, 8, shuffle=True, seed=3, riders=riders, steps=2)) == batches[:2]
    with pytest.raises(ValueError, match="every position rides"):
        Batches(5, 8, shuffle=True, seed=3, riders=np.arange(5))


def test_a_generated_pool_is_md_of_small_molecules_with_the_foundation_and_cached(tmp_path, tiny_model_file):
    recipe = load_recipe_for(tmp_path, tiny_model_file, ["replay.frames=2"])
    water_family = small_molecules({1, 8})
    assert {a.info["replay_molecule"] for a in water_family} >= {"H2O", "H2O2"}
    path = tmp_path / "pool.xyz"
    frames = generated_pool(recipe, {1, 8}, recipe.replay, path)
    assert len(frames) == 2 * len(water_family)
    first = frames[0]
    start = water_family[0]
    assert list(first.numbers) == list(start.numbers)
    assert np.abs(first.positions - start.positions).max() > 1e-3  # the frames are MD, not the start
    assert np.abs(frames[1].positions - first.positions).max() > 1e-3  # and 10 steps apart
    assert all(np.isfinite(f.positions).all() for f in frames)
    again = generated_pool(recipe, {1, 8}, recipe.replay, path)
    np.testing.assert_array_equal(again[0].positions, first.positions)


def load_recipe_for(tmp_path, tiny_model_file, overrides):
    files = {}
    for split in ("train", "valid"):
        files[split] = tmp_path / f"{split}.xyz"
        ase.io.write(files[split], small_molecules({1, 8})[:2])
    return load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_file, files), overrides)


def test_replay_refuses_a_fidelity_named_replay_and_a_named_foundation(tmp_path, tiny_model_file):
    recipe = load_recipe_for(tmp_path, tiny_model_file, ["replay.enabled=true"])
    clash = recipe.model_copy(update={"fidelities": {**recipe.fidelities, "replay": recipe.fidelities["lo"]}})
    with pytest.raises(RecipeError, match="already named 'replay'"):
        replay_recipe(clash, torch.nn.Module(), {1, 8}, tmp_path)
    named = recipe.model_copy(update={"foundation": recipe.foundation.model_copy(update={"model": "mace_off:small"})})
    with pytest.raises(Exception, match=r"local foundation\.model file"):
        replay_recipe(named, torch.nn.Module(), {1, 8}, tmp_path)


def test_the_replay_arm_is_a_recipe_with_replay_on(tmp_path, tiny_model_file):
    from mace_mf.workflows.bench import standard_arms

    recipe = load_recipe_for(tmp_path, tiny_model_file, [])
    arm = standard_arms(recipe, "lo", "hi")["mf-replay"]
    replayed = load_recipe(tmp_path / "r.yaml", list(arm.overrides))
    assert replayed.replay is not None and replayed.replay.enabled and replayed.replay.forces_weight == 100.0


def test_the_forgetting_record_goes_to_wandb_as_drift_and_stable_shares():
    from mace_mf.train.tracking import flatten_forgetting

    record = {
        "held_out": 40,
        "drift": {"f_rmse_meV_A": 12.5, "e_rmse_meV_atom": None},
        "replayed": True,
        "md_check": {"target": {"passed": 19, "structures": 20}, "foundation": {"passed": 20, "structures": 20}},
    }
    assert flatten_forgetting(record) == {
        "forgetting/f_rmse_meV_A": 12.5,
        "forgetting/md_stable_target": 0.95,
        "forgetting/md_stable_foundation": 1.0,
    }
