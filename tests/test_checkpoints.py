"""Checkpoints carry a format; older formats are upgraded on load, newer ones refused.

``tests/data/checkpoint-format1.pt`` was written by mace_mf before checkpoints carried the versions
that wrote them (tests/data/README.md says how). A run folder holding only that file resumes under
today's code and ends as a complete run whose first epoch is the stored one.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from support import ROOT, write_recipe

from mace_mf.config.loading import load_recipe
from mace_mf.errors import RunError
from mace_mf.train.checkpoint import FORMAT, Checkpoints, upgrade
from mace_mf.workflows.run import train_run

STORED = ROOT / "tests" / "data" / "checkpoint-format1.pt"


@pytest.fixture
def format_1_recipe(tmp_path, tiny_model_file, two_fidelity_files):
    """The recipe the stored checkpoint was written with, asking for one more epoch."""
    path = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=2, ema_decay=None)
    tree = yaml.safe_load(path.read_text())
    tree.update(dtype="float32", md_check={"enabled": False})
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_a_format_1_checkpoint_resumes_under_the_current_format(format_1_recipe, tmp_path):
    stored = torch.load(STORED, weights_only=False)
    assert stored["format"] == 1 and "versions" not in stored
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(STORED, out / "checkpoints" / "epoch-0000.pt")
    train_run(load_recipe(format_1_recipe), out, resume=True)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == [0, 1]
    assert history["epochs"][0] == stored["history"]["epochs"][0]  # epoch 0 is the stored one, not rerun
    written = torch.load(out / "checkpoints" / "epoch-0001.pt", weights_only=False)
    assert written["format"] == FORMAT == 2
    assert written["versions"]["torch"] == torch.__version__
    log = (out / "train.log").read_text()
    assert "resumed from epoch-0000.pt (epoch 0, written by mace_mf unknown (format 1))" in log


def test_upgrade_steps_through_every_format():
    state = {"format": 1, "epoch": 3}
    upgraded = upgrade(dict(state), STORED)
    assert upgraded["format"] == FORMAT and upgraded["versions"] == {"mace_mf": "unknown (format 1)"}
    assert upgraded["epoch"] == 3


@pytest.mark.parametrize(
    "state,message",
    [({"format": FORMAT + 1}, "written by a newer mace_mf"), ({"epoch": 0}, "not a mace_mf checkpoint")],
)
def test_a_checkpoint_this_code_cannot_read_is_refused_with_the_fix(tmp_path, state, message):
    folder = Checkpoints(tmp_path)
    torch.save(state, folder.path(0))
    with pytest.raises(RunError, match=message):
        folder.load_latest("cpu")
