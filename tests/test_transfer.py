"""``transfer.enabled``: the recipe, then the target fidelity alone from the model it ended with."""

from __future__ import annotations

import json

import pytest
from support import write_recipe

from mace_mf.config.loading import load_recipe
from mace_mf.errors import RecipeError, RunError
from mace_mf.run_folder import RunFolder
from mace_mf.workflows.run import train_run
from mace_mf.workflows.transfer import FIRST_STAGE, first_stage


def test_second_stage_starts_where_the_first_ended_and_resumes_after_it(tmp_path, tiny_model_file, two_fidelity_files):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    recipe = load_recipe(recipe_file, ["transfer.enabled=true", "transfer.epochs=2"])
    out = tmp_path / "out"
    first = out / FIRST_STAGE
    train_run(first_stage(recipe), first)  # as if the run stopped between its stages
    stamp = RunFolder(first).record_file.stat().st_mtime_ns
    train_run(recipe, out, resume=True)
    assert RunFolder(first).record_file.stat().st_mtime_ns == stamp  # the finished stage is not rerun
    assert RunFolder(out).complete()
    second = load_recipe(RunFolder(out).resolved_recipe)
    assert second.foundation.model == str(RunFolder(first).model("hi").resolve())
    assert (second.fidelities["lo"].energy_weight, second.fidelities["lo"].forces_weight) == (0, 0)
    assert (second.fidelities["hi"].base, second.fidelities["hi"].coupling_strength) == (None, 0)
    assert second.training.epochs == 2 and not second.transfer.enabled
    assert len(json.loads(RunFolder(out).history.read_text())["epochs"]) == 2
    assert sorted(p.name for p in RunFolder(out).models.iterdir()) == ["HEADS.txt", "hi.model"]
    assert RunFolder(first).model("lo").is_file()  # the other fidelities' files stay with the first stage
    # the second stage starts from the first stage's hi model: before training, the same forces
    ended = RunFolder(first).read_metrics()["test"]["hi"]["f_rmse_meV_A"]
    starts = json.loads(RunFolder(out).zero_shot.read_text())["test"]["hi"]["f_rmse_meV_A"]
    assert starts == pytest.approx(ended, rel=1e-6)
    with pytest.raises(RunError, match="already holds a run"):
        train_run(recipe, out)  # a finished run is never trained over unless asked


def test_transfer_refuses_what_it_cannot_do(tmp_path, tiny_model_file, two_fidelity_files):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files)
    with pytest.raises(RecipeError, match=r"transfer\.enabled with replay"):
        load_recipe(recipe_file, ["transfer.enabled=true", "replay.enabled=true"])
    with pytest.raises(RecipeError, match="needs a fidelity besides the target"):
        load_recipe(recipe_file, ["transfer.enabled=true", "fidelities={hi: {energy_key: hi_energy}}"])
