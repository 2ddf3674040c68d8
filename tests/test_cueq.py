"""cuEquivariance: a model converted for training computes what the e3nn model computes and converts
back to the same weights (to rounding); a run trained with it exports stock e3nn files and trains as
an e3nn run does. On a CPU cuequivariance runs its reference implementation, so this is tested
without a GPU."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from physics import HeadForward, StockCalculator, check_same, rattled
from support import write_recipe
from test_head_variants import variant_model

from mace_mf.config.loading import load_recipe
from mace_mf.model.cueq import cueq_available, is_cueq, to_cueq, to_e3nn
from mace_mf.workflows.run import train_run

pytestmark = pytest.mark.skipif(
    not cueq_available(), reason="cuequivariance-torch is not installed (pip install 'mace-mf[cueq]')"
)
STRUCTURES = [rattled(name, seed) for name, seed in (("CH3OH", 1), ("CH3CHO", 2))]


@pytest.mark.parametrize("variant", ["tied", "delta", "embedding"])
def test_a_cueq_model_computes_the_same_heads_and_converts_back_exactly(variant):
    model = variant_model(variant, "float64")
    converted = to_cueq(model)
    assert is_cueq(converted) and not is_cueq(model)
    for head in ("lo", "hi"):
        check_same(HeadForward(model, head), HeadForward(converted, head), STRUCTURES, 1e-12, 1e-12)
    back = to_e3nn(converted)
    assert not is_cueq(back)
    original = model.state_dict()
    for name, value in back.state_dict().items():  # symmetric contractions pass a basis change: rounding
        torch.testing.assert_close(value, original[name], rtol=1e-12, atol=1e-12, msg=name)
    for head in ("lo", "hi"):
        check_same(HeadForward(model, head), HeadForward(back, head), STRUCTURES, 1e-12, 1e-12)


def test_a_cueq_run_exports_stock_files_and_matches_an_e3nn_run(tmp_path, tiny_model_file, two_fidelity_files):
    path = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    tree = yaml.safe_load(path.read_text())
    tree["md_check"] = {"enabled": False}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    e3nn = train_run(load_recipe(path), tmp_path / "e3nn")
    cueq = train_run(load_recipe(path, ["training.cueq=true"]), tmp_path / "cueq")
    # Before training the two are one model (to rounding). After it they agree to 1e-3: Adam divides
    # each gradient by its own running size, so a 1e-16 difference in a near-zero gradient component
    # becomes a difference of lr in the step (measured: 1e-5 relative after 6 steps).
    for name, tolerance in (("zero_shot_metrics.json", 1e-9), ("metrics.json", 1e-3)):
        a, b = (json.loads((run / name).read_text()) for run in (e3nn, cueq))
        for split in a:
            for fidelity in a[split]:
                for key, value in a[split][fidelity].items():
                    expected = pytest.approx(value, rel=tolerance, abs=tolerance)
                    assert b[split][fidelity][key] == expected, (name, split, fidelity, key)
    for name in ("hi.model", "multihead.model"):  # stock e3nn files, whatever kernels trained them
        assert not is_cueq(torch.load(cueq / "models" / name, weights_only=False))
    energy, forces = StockCalculator(cueq / "models" / "hi.model")(STRUCTURES[0])
    assert forces.shape == (len(STRUCTURES[0]), 3) and abs(energy) > 0
