"""Training in two processes (torchrun, gloo) follows the one-process run with the same global batch.

Two processes resume a one-process run from its epoch-0 checkpoint (resume under torchrun) and
train epochs 1 and 2, which must match the one-process epochs. The recipe exercises every part
that can make the two disagree: the heads-only warm-up ends after epoch 1 (DDP is rebuilt when the
trainable parameters change), the ``delta`` coupling penalty (read from parameters, added on every
rank), and 21 training configurations in batches of 10, so the last batch has one configuration
and rank 1 steps on a padding graph. In float64 the only differences left are summation order
(measured: 2e-16 relative in the loss, 4e-16 in the weights), so the tolerance is 1e-11. It fails
when DDP is left out (weights off by 4e-2) and when the gradient is not scaled to the global
average (weights off by 9e-9: Adam is nearly scale-invariant, only its epsilon sees the scale).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from support import ROOT, write_recipe

from mace_mf.config.loading import load_recipe
from mace_mf.data.graphs import Batches
from mace_mf.data.splits import load_splits
from mace_mf.errors import RecipeError
from mace_mf.model.foundation import load_foundation
from mace_mf.train.distributed import Dist, local_batch_size
from mace_mf.train.trainer import Trainer
from mace_mf.workflows.run import train_run

TOLERANCE = 1e-11


def torchrun(*args: str, nproc: int = 2) -> subprocess.Popen[str]:
    """Start ``python -m torch.distributed.run --standalone --nproc_per_node N -m mace_mf.cli ARGS`` (CPU, gloo)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen(
        [*command, "-m", "mace_mf.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = sorted((run / "checkpoints").glob("epoch-*.pt"))[-1]
    return torch.load(latest, weights_only=False)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_file, two_fidelity_files) -> tuple[Path, Path, str]:
    """(one-process run, two-process run resumed from its epoch-0 checkpoint, torchrun's stderr)."""
    folder = tmp_path_factory.mktemp("ddp")
    recipe_file = write_recipe(
        folder / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=3, batch_size=10, freeze_backbone_epochs=2
    )
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["fidelities"]["hi"].update(coupling="delta", coupling_strength=0.01)
    recipe["data"]["max_train"] = 21
    recipe["md_check"] = {"enabled": False}
    recipe["export"].update(fidelities=["hi"], multihead=False)
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    multi = folder / "multi"
    launched: list[subprocess.Popen[str]] = []
    save_checkpoint = Trainer.save_checkpoint

    def hand_over_epoch_0(self: Trainer, epoch: int) -> Path:
        # The two processes start from the reference's epoch-0 checkpoint as soon as it exists, so
        # their start-up (imports: most of their wall time) overlaps the rest of the reference run.
        path = save_checkpoint(self, epoch)
        if epoch == 0:
            (multi / "checkpoints").mkdir(parents=True)
            shutil.copy(path, multi / "checkpoints" / path.name)
            shutil.copy(self.checkpoints.folder.parent / "recipe.resolved.yaml", multi)
            launched.append(torchrun("train", str(recipe_file), "--out", str(multi), "--resume"))
        return path

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Trainer, "save_checkpoint", hand_over_epoch_0)
            single = train_run(load_recipe(recipe_file), folder / "single")
        _, stderr = launched[0].communicate(timeout=600)
    finally:
        if launched and launched[0].poll() is None:
            launched[0].kill()
    assert launched[0].returncode == 0, stderr[-4000:]
    return single, multi, stderr


def test_two_processes_follow_the_one_process_loss_curve(runs):
    single, multi, _ = runs
    one = json.loads((single / "history.json").read_text())["epochs"]
    two = json.loads((multi / "history.json").read_text())["epochs"]
    assert [r["epoch"] for r in two] == [0, 1, 2]
    assert two[0] == one[0]  # restored from the checkpoint; epochs 1 and 2 trained by two processes
    assert [r["frozen_backbone"] for r in two] == [True, True, False]  # DDP rebuilt for epoch 2
    for a, b in zip(one[1:], two[1:], strict=True):
        assert set(a["train"]) == set(b["train"]) and "coupling_penalty" in b["train"]
        for key, value in a["train"].items():
            assert b["train"][key] == pytest.approx(value, rel=TOLERANCE, abs=1e-14), (a["epoch"], key)
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=TOLERANCE)
    # The curve moves by far more than the tolerance: a wrong gradient would show.
    assert abs(one[2]["train"]["loss"] - one[1]["train"]["loss"]) > 1e3 * TOLERANCE * one[1]["train"]["loss"]


def test_two_processes_end_with_the_same_weights_and_metrics(runs, tiny_model_file):
    single, multi, _ = runs
    one, two = last_weights(single), last_weights(multi)
    start = torch.load(tiny_model_file, weights_only=False).state_dict()
    shared = [k for k in one if k.startswith("interactions") and k in start and start[k].shape == one[k].shape]
    assert max((one[k] - start[k]).abs().max().item() for k in shared if one[k].numel()) > 1e-4  # training moved it
    for key, value in one.items():
        if value.is_floating_point() and value.numel():
            assert (two[key] - value).abs().max().item() < TOLERANCE, key
    expected = json.loads((single / "metrics.json").read_text())
    got = json.loads((multi / "metrics.json").read_text())
    for split, fidelities in expected.items():
        for fidelity, entry in fidelities.items():
            for key, value in entry.items():
                assert got[split][fidelity][key] == pytest.approx(value, rel=1e-7), (split, fidelity, key)


def test_only_rank_zero_writes_and_logs(runs):
    _, multi, stderr = runs
    assert json.loads((multi / "run.json").read_text())["status"] == "complete"
    log = (multi / "train.log").read_text()
    assert log.count("resumed from epoch-0000.pt") == 1 and log.count("train loss") == 2
    assert stderr.count("train loss") == 2  # rank 1 logs warnings only
    assert stderr.count("done") == 1
    written = sorted(p.name for p in (multi / "checkpoints").iterdir())
    assert written == ["epoch-0001.pt", "epoch-0002.pt", "latest.json"]


def test_each_global_batch_is_split_into_disjoint_shards():
    one = list(Batches(21, 10, shuffle=True, seed=7))
    perm = torch.randperm(21, generator=torch.Generator().manual_seed(7)).tolist()
    assert one == [perm[0:10], perm[10:20], perm[20:21]]
    three = [list(Batches(21, 9, shuffle=True, seed=7, shard=(r, 3))) for r in range(3)]
    assert [len(b) for b in three] == [3, 3, 3]
    for step in range(3):
        merged = [g for r in range(3) for g in three[r][step]]
        assert merged == perm[9 * step : 9 * step + 9]
    assert list(Batches(21, 10, shuffle=True, seed=7, steps=2)) == one[:2]  # training.steps_per_epoch


def test_padding_graph_has_every_label_masked(tmp_path, tiny_model_file, two_fidelity_files):
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files))
    _, info = load_foundation(recipe.foundation.model, None, torch.float64)
    valid = load_splits(recipe, info, torch.float64).valid.subset(np.arange(3))
    shards = list(valid.loader(2, shuffle=True, seed=0, shard=(1, 2)))
    assert len(shards) == 2 and shards[1].num_graphs == 1  # the last global batch holds one graph: rank 0's
    pad = shards[1]
    assert pad.mf_energy_mask.sum() == 0 and pad.mf_forces_mask.sum() == 0
    assert pad.positions.shape[0] > 0 and all(g.mf_energy_mask.sum() > 0 for g in valid.graphs)


def test_batch_size_must_divide_among_processes():
    assert local_batch_size(12, Dist(0, 4, 0)) == 3
    with pytest.raises(RecipeError, match=r"training\.batch_size: 10 .* 4 processes"):
        local_batch_size(10, Dist(1, 4, 1))
