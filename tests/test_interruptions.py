"""Interruptions lose nothing: checkpoints hold the whole state, a SIGKILLed run resumes exactly,
and a diverging run stops naming the epoch and batch with its last good checkpoint intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from support import ROOT, fidelity_model, write_recipe

from mace_mf.cli import main
from mace_mf.errors import RunError

EPOCHS = 3


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_model_file, two_fidelity_files):
    """A tiny float64, one-thread recipe whose epochs take about a second each on one core."""
    folder = tmp_path_factory.mktemp("interrupt")
    path = write_recipe(folder / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=EPOCHS, batch_size=2)
    tree = yaml.safe_load(path.read_text())
    tree.update(dtype="float64", num_threads=1, md_check={"enabled": False})
    tree["export"] = {"fidelities": ["hi"], "multihead": False, "torchscript": False}  # not what is compared
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(recipe_file):
    """The uninterrupted run."""
    out = recipe_file.parent / "reference"
    assert main(["train", str(recipe_file), "--out", str(out)]) == 0
    return out


def test_checkpoint_holds_everything_needed_to_continue(reference):
    folder = reference / "checkpoints"
    latest = json.loads((folder / "latest.json").read_text())
    assert latest == {"complete": f"epoch-{EPOCHS - 1:04d}.pt", "epoch": EPOCHS - 1}
    assert sorted(p.name for p in folder.glob("epoch-*.pt")) == [f"epoch-{e:04d}.pt" for e in (EPOCHS - 2, EPOCHS - 1)]
    assert not list(folder.glob("*.tmp"))  # atomic writes leave no temporaries
    state = torch.load(folder / latest["complete"], weights_only=False)
    assert state["epoch"] == EPOCHS - 1 and state["seed"] == 0
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == EPOCHS
    assert state["ema"]["num_updates"] == EPOCHS * 12  # 24 configurations, batches of 2
    assert set(state["rng"]) == {"torch", "numpy", "python"}
    assert set(state["model"]) == set(state["best_state"])
    assert len(state["history"]["epochs"]) == EPOCHS


def _read_metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(recipe_file, reference):
    out = recipe_file.parent / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    epoch_time = json.loads((reference / "history.json").read_text())["epochs"][0]["epoch_time_s"]
    with open(recipe_file.parent / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mace_mf.cli", "train", str(recipe_file), "--out", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            first = out / "checkpoints" / "epoch-0000.pt"
            deadline = time.monotonic() + 180
            while not first.exists():
                assert proc.poll() is None, (recipe_file.parent / "killed.log").read_text()
                assert time.monotonic() < deadline, "no checkpoint within 180 s"
                time.sleep(0.02)
            time.sleep(0.4 * epoch_time)  # into epoch 1
            assert proc.poll() is None, "the run finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # no chance to say goodbye
    done = json.loads((out / "checkpoints" / "latest.json").read_text())["epoch"]
    assert done < EPOCHS - 1

    assert main(["train", str(recipe_file), "--out", str(out), "--resume"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == list(range(EPOCHS))
    expected, got = _read_metrics(reference), _read_metrics(out)
    for split in expected:
        for fidelity in expected[split]:
            for key, value in expected[split][fidelity].items():
                assert got[split][fidelity][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (split, fidelity, key)


def test_nan_loss_names_epoch_and_batch_and_keeps_the_last_good_checkpoint(recipe_file, tmp_path):
    """A label that turns NaN after epoch 0 (as a diverging model would) stops epoch 1 at its batch."""
    from mace_mf.config.loading import load_recipe
    from mace_mf.data.splits import load_splits
    from mace_mf.model.foundation import load_foundation
    from mace_mf.train.trainer import Trainer

    recipe = load_recipe(recipe_file)
    foundation, info = load_foundation(recipe.foundation.model, None, torch.float64)
    splits = load_splits(recipe, info, torch.float64)
    model = fidelity_model(foundation, list(recipe.fidelities), info.head)
    poisoned = 7

    def poison(record):
        if record["epoch"] == 0:
            splits.train.graphs[poisoned].mf_energy[0, 1] = float("nan")

    folder = tmp_path / "checkpoints"
    trainer = Trainer(model, recipe, splits.train, splits.valid, torch.device("cpu"), folder, on_epoch=poison)
    with pytest.raises(RunError) as info_:
        trainer.fit()
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(recipe.seed * 100_003 + 1))
    batch = order.tolist().index(poisoned) // recipe.training.batch_size
    message = str(info_.value)
    assert f"loss is nan at epoch 1, batch {batch}" in message
    assert "epoch-0000.pt is kept" in message and "lower training.lr" in message
    assert sorted(p.name for p in folder.glob("*.pt")) == ["epoch-0000.pt"]
    assert json.loads((folder / "latest.json").read_text())["epoch"] == 0
    state = torch.load(folder / "epoch-0000.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_ctrl_c_says_how_to_continue_and_the_run_says_interrupted(recipe_file, reference):
    """SIGINT (Ctrl-C, `kill -INT`) mid-run: exit 130, one line saying how to continue, run.json
    `interrupted`; the resume then ends where an uninterrupted run ends."""
    out = recipe_file.parent / "ctrl-c"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def default_sigint() -> None:  # a background job (CI) starts children with SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(
        [sys.executable, "-m", "mace_mf.cli", "train", str(recipe_file), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "epoch-0000.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert (
        f"interrupted; the last complete epoch is kept: continue with mace-mf train {recipe_file} --out {out} --resume"
        in stderr.replace("\n", " ")
    )
    assert "Traceback" not in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert main(["train", str(recipe_file), "--out", str(out), "--resume"]) == 0
    expected, got = _read_metrics(reference), _read_metrics(out)
    for split in expected:
        for fidelity in expected[split]:
            for key, value in expected[split][fidelity].items():
                assert got[split][fidelity][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (split, fidelity, key)
