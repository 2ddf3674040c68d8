"""W&B offline runs: what is logged is read back from the run file itself."""

from __future__ import annotations

import json

from support import write_recipe
from wandb_records import read_records

from mace_mf.recipe import load_recipe
from mace_mf.run import train_run


def items(update):
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def test_offline_run_logs_config_epochs_and_final_metrics(tmp_path, tiny_model_file, two_fidelity_files, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=2)
    out = train_run(
        load_recipe(recipe_file, ["wandb.mode=offline", "wandb.tags=[test]"]), tmp_path / "out", recipe_file=recipe_file
    )
    run_id = json.loads((out / "run.json").read_text())["wandb_id"]
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = read_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["epoch"] for h in history] == [0, 1]
    for key in ("train/loss", "train/lo/f_mse", "train/hi/e_mse", "valid/hi/f_rmse_meV_A", "lr/readouts"):
        assert key in history[0], key
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["final/test/hi/f_rmse_meV_A"] == metrics["test"]["hi"]["f_rmse_meV_A"]
    assert summary["valid/hi/f_rmse_meV_A"] == {"min": min(h["valid/hi/f_rmse_meV_A"] for h in history)}
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["fidelities"]["hi"]["forces_weight"] == 0.0
    assert list(run_record.tags) == ["test"]
    assert "files" in kinds


def test_disabled_mode_writes_nothing(tmp_path, tiny_model_file, two_fidelity_files):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=0)
    out = train_run(load_recipe(recipe_file), tmp_path / "out")
    assert not (out / "wandb").exists()
    assert json.loads((out / "run.json").read_text())["wandb_id"] is None
