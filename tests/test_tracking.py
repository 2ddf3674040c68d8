"""W&B offline runs: what is logged is read back from the run files themselves."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import pytest
from support import ROOT, write_recipe
from wandb_records import history_rows, of_type, read_records, run_config, summary_of

from mace_mf.cli import main
from mace_mf.config.loading import load_recipe
from mace_mf.train.tracking import FLUSH_INTERVAL_S, effective_mode, flatten_epoch
from mace_mf.workflows.run import train_run


def nested(row, prefix):
    """The fields of a media value (image, table) logged under ``prefix``."""
    return {k.removeprefix(prefix + "."): v for k, v in row.items() if k.startswith(prefix + ".")}


def md5_b64(path):
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def offline_parts(folder, run_id):
    """The offline folders of one run in the order they were made: a part started in the same
    second as the one before is ``offline-run-<time>-<id>-1`` (the glob the sync hint prints)."""
    return sorted(folder.glob(f"offline-run-*-{run_id}*"))


def test_offline_run_resumes_with_its_id_and_logs_metrics_media_and_model_artifact(
    tmp_path, tiny_model_file, two_fidelity_files, wandb_env, monkeypatch, caplog
):
    monkeypatch.delenv("WANDB_DIR")  # the default place: <run folder>/wandb
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=2)
    # online without a key falls back to offline; the recipe (and so the resumed run's) asks for online
    recipe = load_recipe(recipe_file, ["wandb.mode=online", "wandb.tags=[test]", "wandb.group=g"])
    out = tmp_path / "out"

    from mace_mf.train import trainer as train_module

    original = train_module.Trainer.save_checkpoint

    def interrupt_after_epoch_0(self, epoch):
        path = original(self, epoch)
        if epoch == 0:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_module.Trainer, "save_checkpoint", interrupt_after_epoch_0)
    with caplog.at_level("INFO", logger="mace_mf"), pytest.raises(KeyboardInterrupt):
        train_run(recipe, out, recipe_file=recipe_file)
    first_id = json.loads((out / "run.json").read_text())["wandb_id"]
    fallback = [r.getMessage() for r in caplog.records if "logging offline" in r.getMessage()]
    assert len(fallback) == 1 and "no API key" in fallback[0]
    assert fallback[0].endswith(f"`wandb sync {out}/wandb/offline-run-*-{first_id}*`")
    monkeypatch.setattr(train_module.Trainer, "save_checkpoint", original)
    train_run(recipe, out, recipe_file=recipe_file, resume=True)

    run_id = json.loads((out / "run.json").read_text())["wandb_id"]
    assert run_id == first_id
    parts = offline_parts(out / "wandb", run_id)
    assert len(parts) == 2  # the interrupted part and the resumed part, one W&B run id
    first, second = (read_records(p / f"run-{run_id}.wandb") for p in parts)
    assert [[run["run_id"] for run in of_type(part, "run")] for part in (first, second)] == [[run_id], [run_id]]
    assert [exit_["exit_code"] for exit_ in of_type(first, "exit")] == [1]  # the interrupted part is closed

    # per-epoch metrics: epoch 0 before the interruption, epoch 1 after; the same numbers as history.json
    history = json.loads((out / "history.json").read_text())["epochs"]
    logged = [row for part in (first, second) for row in history_rows(part) if "train/loss" in row]
    assert [row["epoch"] for row in logged] == [0, 1]
    for row, record in zip(logged, history, strict=True):
        for key, value in flatten_epoch(record).items():
            assert row[key] == pytest.approx(value, rel=1e-12), key
    for key in (
        "train/loss",
        "train/lo/e_mse",
        "train/lo/f_mse",
        "train/hi/e_mse",
        "valid/loss",
        "valid/hi/e_rmse_meV_atom",
        "valid/hi/e_mae_meV_atom",
        "valid/hi/f_rmse_meV_A",
        "valid/lo/f_mae_meV_A",
        "lr/readouts",
        "lr/interactions",
        "epoch_time_s",
        "configs_per_s",
    ):
        assert key in logged[1], key
    assert "train/hi/f_mse" not in logged[1]  # hi forces are scored, never trained on

    # config: the full resolved recipe, tags and group; the recipe file saved with the run
    (run_record,) = of_type(first, "run")
    config = run_config(run_record)
    assert config["fidelities"]["hi"]["forces_weight"] == 0.0
    assert config["training"]["epochs"] == 2 and config["wandb"]["mode"] == "online"
    assert run_record["tags"] == ["test"] and run_record["run_group"] == "g"
    saved = {f["path"] for part in (first, second) for files in of_type(part, "files") for f in files["files"]}
    assert {"recipe.yaml", "report.md", "metrics.json"} <= saved

    # summaries: the best validation value of the target, and every final metric
    summary = summary_of(second)
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["final/test/hi/f_rmse_meV_A"] == metrics["test"]["hi"]["f_rmse_meV_A"]
    assert summary["final/valid/lo/e_mae_meV_atom"] == metrics["valid"]["lo"]["e_mae_meV_atom"]
    assert summary["valid/hi/f_rmse_meV_A"] == {"min": logged[1]["valid/hi/f_rmse_meV_A"]}

    # media: the metrics table and the parity plots and learning curve, as files in the run folder
    (final,) = [row for row in history_rows(second) if any(k.startswith("final/metrics.") for k in row)]
    files_dir = parts[1] / "files"
    table = nested(final, "final/metrics")
    assert table["_type"] == "table-file" and table["nrows"] == 6
    content = json.loads((files_dir / table["path"]).read_text())
    rows = {(r[0], r[1]): dict(zip(content["columns"], r, strict=True)) for r in content["data"]}
    assert rows[("test", "hi")]["f_rmse_meV_A"] == pytest.approx(metrics["test"]["hi"]["f_rmse_meV_A"], rel=1e-12)
    assert rows[("test", "lo")]["n_e"] == 8
    for plot in ("parity_test_hi", "parity_valid_lo", "learning_curve"):
        image = nested(final, f"plots/{plot}")
        assert image["_type"] == "image-file", plot
        assert (files_dir / image["path"]).read_bytes() == (out / "plots" / f"{plot}.png").read_bytes()

    # the model artifact: exported files with their digests, metadata, aliases best and latest
    (artifact,) = [a for a in of_type(second, "artifact") if a["type"] == "model"]
    assert artifact["name"] == f"model-{run_id}" and set(artifact["aliases"]) == {"best", "latest"}
    meta = json.loads(artifact["metadata"])
    assert meta["fidelities"] == ["lo", "hi"] and meta["elements"] == ["H", "C", "N", "O"]
    assert meta["r_max"] == 4.0 and meta["foundation"] == str(tiny_model_file)
    assert meta["mace_torch"] == version("mace-torch")
    assert meta["best_epoch"] == json.loads((out / "history.json").read_text())["best_epoch"]
    entries = {c["path"]: c for c in artifact["manifest"]["contents"]}
    for name in ("models/hi.model", "models/lo.model", "models/multihead.model", "models/HEADS.txt", "report.md"):
        assert entries[name]["digest"] == md5_b64(out / name), name
    assert not of_type(first, "artifact")  # nothing final was logged by the interrupted part


def test_disabled_mode_writes_nothing(tmp_path, tiny_model_file, two_fidelity_files, wandb_env):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=0)
    out = train_run(load_recipe(recipe_file), tmp_path / "out")
    assert not (out / "wandb").exists()
    assert not any(wandb_env.iterdir())
    assert json.loads((out / "run.json").read_text())["wandb_id"] is None


def test_online_without_key_or_server_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert effective_mode("online")[0] == "offline" and "API key" in effective_mode("online")[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    mode, reason = effective_mode("online")
    assert mode == "offline" and "not reachable" in reason
    assert effective_mode("offline") == ("offline", None) and effective_mode("disabled") == ("disabled", None)


def test_a_killed_offline_run_keeps_what_it_logged_and_its_resume_continues_the_run(
    tmp_path, tiny_model_file, two_fidelity_files, wandb_env, monkeypatch
):
    """SIGKILL gives wandb no chance to close its log: what was logged a flush interval before the
    kill must already be in the file, readable (and so syncable) by wandb's own reader."""
    monkeypatch.delenv("WANDB_DIR")
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=8, batch_size=2)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mace_mf.cli", "train", str(recipe_file), "--out", str(out), "--wandb", "offline"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            first = out / "checkpoints" / "epoch-0000.pt"
            deadline = time.monotonic() + 180
            while not first.exists():
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no checkpoint within 180 s"
                time.sleep(0.02)
            time.sleep(2 * FLUSH_INTERVAL_S + 0.5)
            assert proc.poll() is None, "the run finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    run_id = json.loads((out / "run.json").read_text())["wandb_id"]
    (killed,) = offline_parts(out / "wandb", run_id)
    records = read_records(killed / f"run-{run_id}.wandb")
    assert [run["run_id"] for run in of_type(records, "run")] == [run_id]
    logged = sorted({row["epoch"] for row in history_rows(records) if "train/loss" in row})
    done = json.loads((out / "checkpoints" / "latest.json").read_text())["epoch"]
    # epoch 0 was logged a flush interval and more before the kill: it is on disk, and so is the run
    # record; what the file holds is every epoch from 0 on, without a gap (the last ones may be lost)
    assert logged == list(range(len(logged))) and logged
    assert done >= logged[-1]

    assert main(["train", str(recipe_file), "--out", str(out), "--resume", "--wandb", "offline"]) == 0
    parts = offline_parts(out / "wandb", run_id)
    assert len(parts) == 2 and parts[0] == killed
    resumed = read_records(parts[1] / f"run-{run_id}.wandb")
    assert [run["run_id"] for run in of_type(resumed, "run")] == [run_id]
    epochs = [row["epoch"] for row in history_rows(resumed) if "train/loss" in row]
    assert epochs == list(range(done + 1, 8))
    assert [e["exit_code"] for e in of_type(resumed, "exit")] == [0]


def test_a_recipe_that_disables_wandb_says_so_when_the_environment_asks_for_it(
    tmp_path, tiny_model_file, two_fidelity_files, wandb_env, caplog
):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=0)
    with caplog.at_level("INFO", logger="mace_mf"):
        train_run(load_recipe(recipe_file), tmp_path / "out")  # the recipe's default: wandb.mode disabled
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wandb:")]
    assert "disabled by the recipe (wandb.mode: disabled)" in line and "WANDB_MODE=offline" in line
    assert "--wandb offline" in line
    assert (
        not (tmp_path / "out" / "wandb").exists()
        and "disabled by the recipe" in (tmp_path / "out" / "train.log").read_text()
    )
