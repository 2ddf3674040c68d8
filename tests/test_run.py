"""End to end: recipe in, fine-tuned heads, metrics, reports and stock-loadable files out."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from support import write_recipe

from mace_mf.cli import main
from mace_mf.config.loading import load_recipe
from mace_mf.workflows.run import train_run

STOCK_EVAL = textwrap.dedent(
    """
    import json, sys
    import numpy as np, ase.io
    from mace.calculators import MACECalculator
    results = []
    for job in json.loads(sys.argv[1]):
        calc = MACECalculator(model_paths=job["model"], device="cpu", default_dtype="float64", **job["extra"])
        e_err, f_err = [], []
        for atoms in ase.io.read(job["data"], ":"):
            atoms.calc = calc
            e_err.append((atoms.get_potential_energy() - atoms.info[job["label"] + "_energy"]) / len(atoms))
            f_err.append((atoms.get_forces() - atoms.arrays[job["label"] + "_forces"]).ravel())
        e, f = np.array(e_err) * 1000, np.concatenate(f_err) * 1000
        results.append({"e_rmse": float(np.sqrt((e**2).mean())), "f_rmse": float(np.sqrt((f**2).mean())),
                        "forces0": calc.get_forces(atoms).tolist()})
    assert "mace_mf" not in sys.modules
    print(json.dumps(results))
    """
)


def stock_eval(*jobs):
    """Run (model, data, label, extra-kwargs) jobs through stock MACECalculator in a fresh process."""
    payload = [{"model": str(m), "data": str(d), "label": lab, "extra": extra} for m, d, lab, extra in jobs]
    out = subprocess.run(
        [sys.executable, "-c", STOCK_EVAL, json.dumps(payload)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_model_file, two_fidelity_files):
    folder = tmp_path_factory.mktemp("run")
    recipe_file = write_recipe(folder / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=4)
    out = folder / "out"
    assert main(["train", str(recipe_file), "--out", str(out)]) == 0
    return out


def test_run_folder_holds_every_promised_file(short_run):
    for name in (
        "metrics.json",
        "report.md",
        "recipe.resolved.yaml",
        "run.json",
        "history.json",
        "models/hi.model",
        "models/lo.model",
        "models/multihead.model",
        "plots/parity_test_hi.png",
        "plots/learning_curve.png",
    ):
        assert (short_run / name).is_file(), name
    assert json.loads((short_run / "run.json").read_text())["status"] == "complete"
    assert list((short_run / "checkpoints").glob("epoch-*.pt"))
    report = (short_run / "report.md").read_text()
    assert "parity_test_hi.png" in report and "| test | hi |" in report


def test_metrics_have_the_documented_shape_and_score_untrained_forces(short_run):
    metrics = json.loads((short_run / "metrics.json").read_text())
    assert set(metrics) == {"train", "valid", "test"}
    hi = metrics["test"]["hi"]
    assert set(hi) == {"e_mae_meV_atom", "e_rmse_meV_atom", "f_mae_meV_A", "f_rmse_meV_A", "n_e", "n_f"}
    assert hi["n_e"] == 8 and hi["n_f"] == 8  # hi forces exist, are scored, and were never trained on


def test_training_on_low_forces_improves_high_forces_over_zero_shot(short_run):
    metrics = json.loads((short_run / "metrics.json").read_text())
    zero = json.loads((short_run / "zero_shot_metrics.json").read_text())
    assert metrics["test"]["hi"]["f_rmse_meV_A"] < zero["test"]["hi"]["f_rmse_meV_A"]
    assert metrics["test"]["lo"]["f_rmse_meV_A"] < zero["test"]["lo"]["f_rmse_meV_A"]


def test_stock_calculator_reproduces_metrics_in_a_process_without_mace_mf(short_run, two_fidelity_files):
    metrics = json.loads((short_run / "metrics.json").read_text())["test"]
    test = two_fidelity_files["test"]
    models = short_run / "models"
    jobs = [(models / f"{h}.model", test, h, {}) for h in ("hi", "lo")]
    jobs += [(models / "multihead.model", test, h, {"head": h}) for h in ("hi", "lo")]
    for (_, _, head, _), result in zip(jobs, stock_eval(*jobs), strict=True):
        assert result["e_rmse"] == pytest.approx(metrics[head]["e_rmse_meV_atom"], rel=1e-6)
        assert result["f_rmse"] == pytest.approx(metrics[head]["f_rmse_meV_A"], rel=1e-6)


def test_zero_epochs_exports_the_foundation_forces(tmp_path, tiny_model_file, two_fidelity_files):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=0)
    out = train_run(load_recipe(recipe_file), tmp_path / "out")
    exported, foundation = stock_eval(
        (out / "models" / "hi.model", two_fidelity_files["test"], "hi", {}),
        (tiny_model_file, two_fidelity_files["test"], "hi", {}),
    )
    assert torch.tensor(exported["forces0"]).sub(torch.tensor(foundation["forces0"])).abs().max() < 1e-6


def test_resume_after_interruption_matches_an_uninterrupted_run(
    tmp_path, tiny_model_file, two_fidelity_files, monkeypatch
):
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=3))
    reference = train_run(recipe, tmp_path / "reference")

    from mace_mf.train import trainer as train_module

    original = train_module.Trainer.save_checkpoint

    def interrupt_after_epoch_1(self, epoch):
        path = original(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_module.Trainer, "save_checkpoint", interrupt_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_run(recipe, tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(train_module.Trainer, "save_checkpoint", original)
    train_run(recipe, tmp_path / "resumed", resume=True)
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == [0, 1, 2]
    expected = json.loads((reference / "metrics.json").read_text())
    got = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    for split in expected:
        for fidelity in expected[split]:
            for key, value in expected[split][fidelity].items():
                assert got[split][fidelity][key] == pytest.approx(value, rel=1e-9, abs=1e-9), (split, fidelity, key)


def test_torchscript_export_matches_the_model(tmp_path, short_run):
    from ase.build import molecule
    from mace.calculators import MACECalculator

    assert main(["export", str(short_run), "--out", str(tmp_path / "exported"), "--fidelity", "hi"]) == 0
    compiled = torch.jit.load(str(tmp_path / "exported" / "hi.compiled.model"))
    atoms = molecule("CH3OH")
    atoms.calc = MACECalculator(models=compiled, device="cpu", default_dtype="float64")
    e_compiled = atoms.get_potential_energy()
    atoms.calc = MACECalculator(
        model_paths=str(short_run / "models" / "hi.model"), device="cpu", default_dtype="float64"
    )
    assert e_compiled == pytest.approx(atoms.get_potential_energy(), abs=1e-8)


def test_eval_command_scores_a_model_file(tmp_path, short_run, two_fidelity_files):
    out = tmp_path / "eval.json"
    code = main(["eval", str(short_run / "models" / "hi.model"), str(two_fidelity_files["test"]), "--json", str(out)])
    assert code == 0
    expected = json.loads((short_run / "metrics.json").read_text())["test"]["hi"]
    assert json.loads(out.read_text())["hi"]["f_rmse_meV_A"] == pytest.approx(expected["f_rmse_meV_A"], rel=1e-9)
    assert main(["eval", str(short_run), str(two_fidelity_files["test"]), "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"lo", "hi"}


def test_quickstart_recipe_runs_on_the_bundled_demo(tmp_path):
    from support import ROOT

    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml", ["training.epochs=1", "export.torchscript=false", "md_check.steps=5"]
    )
    out = train_run(recipe, tmp_path / "quickstart")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["dft"]["n_f"] == 40 and metrics["test"]["xtb"]["n_e"] == 40


def test_seed_regime_recipe_runs_on_its_bundled_ladder(tmp_path):
    """The `make demo` recipe: every geometry carries all four levels; QZVP forces are only scored."""
    import ase.io
    from support import ROOT

    frames = ase.io.read(ROOT / "demo" / "seed_regime" / "valid.xyz", ":")
    for level in ("xtb", "svp", "tzvp", "qzvp"):
        assert all(f"{level}_energy" in a.info and f"{level}_forces" in a.arrays for a in frames), level
    sets = ["training.epochs=1", "export.torchscript=false", "md_check.enabled=false"]
    recipe = load_recipe(ROOT / "recipes" / "seed_regime.yaml", sets)
    assert recipe.fidelities["qzvp"].forces_weight == 0 and recipe.fidelities["qzvp"].base == "tzvp"
    out = train_run(recipe, tmp_path / "seed")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["qzvp"]["n_f"] == 40 and metrics["train"]["tzvp"]["n_f"] == 160


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_model_file, two_fidelity_files, caplog):
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=2))
    out = train_run(recipe, tmp_path / "out")
    latest = out / "checkpoints" / "epoch-0001.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a torn write
    with caplog.at_level("WARNING", logger="mace_mf"):
        train_run(recipe, out, resume=True)
    assert "epoch-0001.pt unreadable" in caplog.text
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == [0, 1]
    assert torch.load(latest, weights_only=False)["epoch"] == 1  # rewritten whole
