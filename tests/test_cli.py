"""Every CLI error is one line on stderr with exit code 2, and leaves earlier runs untouched."""

from __future__ import annotations

import json

import ase.io
import pytest
from support import label, sample_molecules, write_recipe

from mace_mf.cli import main


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # log lines may precede it, nothing follows
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.fixture
def recipe_file(tmp_path, tiny_model_file, two_fidelity_files):
    return write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)


def test_missing_recipe(capsys, tmp_path):
    code, err = run_cli(capsys, "train", tmp_path / "none.yaml")
    assert_one_line_error(code, err, "none.yaml", "recipe file not found")


def test_unknown_key_with_suggestion(capsys, recipe_file):
    code, err = run_cli(capsys, "train", recipe_file, "--set", "training.learning_rate=0.1")
    assert_one_line_error(code, err, "training.learning_rate", "did you mean 'lr'")


def test_bad_set_syntax(capsys, recipe_file):
    code, err = run_cli(capsys, "recipe", "check", recipe_file, "--set", "training.lr")
    assert_one_line_error(code, err, "expected dotted.key=value")


def test_recipe_check_prints_resolved_defaults(capsys, recipe_file):
    code = main(["recipe", "check", str(recipe_file)])
    out = capsys.readouterr().out
    assert code == 0 and "freeze_backbone_epochs: 0" in out and "target: hi" in out


def test_recipe_check_names_a_file_that_does_not_exist(capsys, tmp_path, recipe_file):
    for key in ("data.valid", "data.valid_pairs", "foundation.model", "replay.pool"):
        code, err = run_cli(capsys, "recipe", "check", recipe_file, "--set", f"{key}={tmp_path / 'missing.xyz'}")
        assert_one_line_error(code, err, f"{key}: {tmp_path / 'missing.xyz'} not found", "check")


def test_a_text_file_given_as_the_foundation_is_called_a_text_file(capsys, tmp_path, recipe_file):
    text = tmp_path / "notes.model"
    text.write_text("this is my foundation, I promise\n")
    code, err = run_cli(capsys, "train", recipe_file, "--set", f"foundation.model={text}", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "notes.model is a text file, not a MACE model", "give a MACE .model file")


def test_a_misspelt_energy_key_gets_the_stored_key_suggested(capsys, tmp_path, recipe_file):
    code, err = run_cli(
        capsys, "train", recipe_file, "--set", "fidelities.hi.energy_key=hi_energies", "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, "'hi_energies' is in no configuration (did you mean 'hi_energy'?)", "check")


def test_foundation_file_that_is_not_a_model(capsys, tmp_path, recipe_file):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x80\x04not a pickle at all")
    code, err = run_cli(capsys, "train", recipe_file, "--set", f"foundation.model={bad}", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "bad.model", "not a loadable MACE model")


def test_named_foundation_offline_says_where_to_put_the_file(capsys, recipe_file, tmp_path, monkeypatch):
    from mace.calculators import foundations_models

    def offline(*args, **kwargs):
        raise RuntimeError("Model download failed and no local model found")

    monkeypatch.setattr(foundations_models, "mace_off", offline)
    code, err = run_cli(
        capsys, "train", recipe_file, "--set", "foundation.model=mace_off:small", "--out", tmp_path / "o"
    )
    assert_one_line_error(
        code, err, "could not download 'mace_off:small'", "copy the file to", "MACE-OFF23_small.model"
    )


def test_elements_outside_the_foundation_are_named(capsys, tmp_path, recipe_file):
    frames = sample_molecules(3, seed=9)
    frames[0].symbols[0] = "S"
    label(frames, "lo", 1.0, 1.2, 0.0)
    label(frames, "hi", 1.0, 1.2, 0.0)
    path = tmp_path / "with_s.xyz"
    ase.io.write(path, frames)
    code, err = run_cli(capsys, "train", recipe_file, "--set", f"data.train={path}", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "data.train", "elements S are not covered by the foundation")


def test_target_without_validation_labels(capsys, tmp_path, recipe_file, two_fidelity_files):
    frames = ase.io.read(two_fidelity_files["valid"], ":")
    for atoms in frames:
        del atoms.info["hi_energy"]
        del atoms.arrays["hi_forces"]
    path = tmp_path / "valid_no_hi.xyz"
    ase.io.write(path, frames)
    code, err = run_cli(capsys, "train", recipe_file, "--set", f"data.valid={path}", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "training.target", "'hi' has no labels in the validation data")


def test_existing_run_is_never_overwritten_unless_asked(capsys, tmp_path, recipe_file):
    out = tmp_path / "run"
    assert main(["train", str(recipe_file), "--out", str(out)]) == 0
    metrics = (out / "metrics.json").read_text()
    code, err = run_cli(capsys, "train", recipe_file, "--out", out)
    assert_one_line_error(code, err, str(out), "already holds a run", "--resume", "--overwrite")
    assert (out / "metrics.json").read_text() == metrics
    code, err = run_cli(capsys, "train", recipe_file, "--out", out, "--set", "training.lr=0.01")
    assert code == 2
    code, err = run_cli(capsys, "train", recipe_file, "--out", out, "--resume", "--set", "training.lr=0.01")
    assert_one_line_error(code, err, "recipe differs from the run being resumed (training.lr: 0.005 -> 0.01)")
    assert main(["train", str(recipe_file), "--out", str(out), "--overwrite", "--set", "training.lr=0.01"]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_resume_needs_a_run(capsys, tmp_path, recipe_file):
    code, err = run_cli(capsys, "train", recipe_file, "--out", tmp_path / "empty", "--resume")
    assert_one_line_error(code, err, "no run to resume here")
    code, err = run_cli(capsys, "train", recipe_file, "--resume")
    assert_one_line_error(code, err, "--resume needs --out")


def test_unknown_head_in_eval(capsys, tmp_path, tiny_model_file, two_fidelity_files):
    code, err = run_cli(capsys, "eval", tiny_model_file, two_fidelity_files["test"], "--head", "ccsdt")
    assert_one_line_error(code, err, "--head 'ccsdt'", "not a head of")


def test_debug_flag_shows_the_traceback(tmp_path):
    from mace_mf.errors import RecipeError

    with pytest.raises(RecipeError):
        main(["--debug", "train", str(tmp_path / "none.yaml")])
