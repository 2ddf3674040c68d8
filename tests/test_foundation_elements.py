"""`foundation.elements: data`: the foundation cut down to the data's elements is the same function."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from support import label, sample_molecules, tiny_scale_shift_mace, write_recipe
from test_run import stock_eval

from mace_mf.config.loading import load_recipe
from mace_mf.model.foundation import keep_elements, load_foundation
from mace_mf.model.heads import extract_head
from mace_mf.workflows.run import train_run


def without_nitrogen(n: int, seed: int) -> list:
    return [a for a in sample_molecules(n, seed) if 7 not in a.numbers]


@pytest.mark.parametrize("residual_first", [True, False], ids=["residual-first", "upstream-layout"])
def test_kept_elements_give_the_same_energies_and_forces(tmp_path, residual_first):
    path = tmp_path / "foundation.model"
    torch.save(tiny_scale_shift_mace(residual_first, seed=3), path)
    foundation, info = load_foundation(str(path), None, torch.float64)
    cut = keep_elements(extract_head(foundation, info.head), info, [1, 6, 8])
    assert [int(z) for z in cut.atomic_numbers] == [1, 6, 8]
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in foundation.parameters())
    torch.save(cut, tmp_path / "cut.model")
    data = tmp_path / "molecules.xyz"
    frames = without_nitrogen(8, seed=5)
    label(frames, "x", 1.0, 1.2, 0.0)
    ase.io.write(data, frames, format="extxyz")
    full, reduced = stock_eval((path, data, "x", {}), (tmp_path / "cut.model", data, "x", {}))
    assert reduced["e_rmse"] == pytest.approx(full["e_rmse"], rel=1e-9)  # energy errors against the labels
    assert reduced["f_rmse"] == pytest.approx(full["f_rmse"], rel=1e-9)
    np.testing.assert_allclose(reduced["forces0"], full["forces0"], atol=1e-9)


def test_a_run_keeps_only_the_datas_elements_unless_asked(tmp_path, tiny_model_file):
    files = {}
    for split, seed in (("train", 1), ("valid", 2), ("test", 3)):
        frames = without_nitrogen(12, seed)
        label(frames, "lo", 0.9, 1.25, -10.0)
        label(frames, "hi", 1.0, 1.2, -50.0)
        files[split] = tmp_path / f"{split}.xyz"
        ase.io.write(files[split], frames, format="extxyz")
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, files, epochs=0)
    cut = train_run(load_recipe(recipe_file), tmp_path / "data")
    kept = train_run(load_recipe(recipe_file, ["foundation.elements=all"]), tmp_path / "all")
    assert [int(z) for z in torch.load(cut / "models" / "hi.model", weights_only=False).atomic_numbers] == [1, 6, 8]
    assert [int(z) for z in torch.load(kept / "models" / "hi.model", weights_only=False).atomic_numbers] == [1, 6, 7, 8]
    # no training: both exports carry the foundation's forces (E0 refits change energies only)
    exported, foundation = stock_eval(
        (cut / "models" / "hi.model", files["test"], "hi", {}), (tiny_model_file, files["test"], "hi", {})
    )
    np.testing.assert_allclose(exported["forces0"], foundation["forces0"], atol=1e-9)
