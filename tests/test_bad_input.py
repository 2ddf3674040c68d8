"""The bad-input catalogue: every way a user can hand mace_mf broken input, and the one line it answers.

Each case writes one broken input, runs the real CLI (``mace_mf.cli.main``, the console script's
entry point) and checks the contract: exit code 2, exactly one ``error:`` line and nothing after it,
no traceback, a message naming the file/key/configuration at fault *and* the fix, and no output
folder that looks like a finished run. A few cases also run as a separate process, to prove that
nothing but that line reaches stderr.

The README's "Troubleshooting" section is generated from this table
(``python tests/test_bad_input.py`` prints it) and a test keeps the two in sync.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from support import ROOT, build_tiny_mace, fidelity_model, label, sample_molecules, write_recipe

from mace_mf.cli import main


@dataclass
class Workspace:
    """A folder with a valid tiny recipe, data and foundation; cases break one thing in it."""

    tmp: Path
    model: Path
    files: dict[str, Path]

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def recipe(self, **training: object) -> Path:
        return write_recipe(self.tmp / "recipe.yaml", self.model, self.files, epochs=1, **training)

    def train(self, *extra: object) -> list[str]:
        return ["train", str(self.recipe()), "--out", str(self.out), *map(str, extra)]

    def text_recipe(self, text: str, name: str = "bad.yaml") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def recipe_edit(self, edit: Callable[[dict], None]) -> list[str]:
        tree = yaml.safe_load(self.recipe().read_text())
        edit(tree)
        path = self.text_recipe(yaml.safe_dump(tree, sort_keys=False), "edited.yaml")
        return ["train", str(path), "--out", str(self.out)]

    def data(self, frames: list[Atoms], name: str = "bad.xyz") -> Path:
        path = self.tmp / name
        ase.io.write(path, frames, format="extxyz")
        return path

    def labelled(self, n: int = 4, seed: int = 11, forces: bool = True) -> list[Atoms]:
        frames = sample_molecules(n, seed)
        label(frames, "lo", 0.9, 1.25, -10.0, forces=forces)
        label(frames, "hi", 1.0, 1.2, -50.0)
        return frames

    def with_train(self, frames: list[Atoms]) -> list[str]:
        return self.train("--set", f"data.train={self.data(frames)}")

    def foundation(self, obj: object, name: str = "bad.model") -> list[str]:
        path = self.tmp / name
        torch.save(obj, path)
        return self.train("--set", f"foundation.model={path}")

    def multihead(self) -> Path:

        path = self.tmp / "two_heads.model"
        torch.save(fidelity_model(build_tiny_mace(), ["pbe", "ccsdt"]), path)
        return path

    def fake_run(self) -> Path:
        """An output folder that holds a run (what ``prepare_out`` recognises)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "run.json").write_text(json.dumps({"status": "complete"}))
        return self.out


@dataclass(frozen=True)
class Case:
    """One catalogue entry: how to break the input, what the user sees, how they fix it."""

    id: str
    problem: str  # README: what went wrong, in the user's words
    make: Callable[[Workspace], list[str]]  # writes the broken input; returns the CLI arguments
    names: str  # the message names the file, key or configuration with this
    fix: str  # ... and says how to fix it with this


def _set(*pairs: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: ws.train(*[arg for pair in pairs for arg in ("--set", pair)])


def _corrupt_frame(change: Callable[[Atoms], None]) -> Callable[[Workspace], list[str]]:
    def make(ws: Workspace) -> list[str]:
        frames = ws.labelled()
        change(frames[2])
        return ws.with_train(frames)

    return make


def _nan_energy(atoms: Atoms) -> None:
    atoms.info["hi_energy"] = float("nan")


def _inf_force(atoms: Atoms) -> None:
    atoms.arrays["lo_forces"][0, 1] = np.inf


def _text_energy(atoms: Atoms) -> None:
    atoms.info["lo_energy"] = "n/a"


def _wrong_shape(ws: Workspace) -> list[str]:
    frames = ws.labelled()
    for atoms in frames:
        atoms.new_array("lo_grad", np.zeros((len(atoms), 2 if atoms is frames[2] else 3)))
    return ws.train("--set", f"data.train={ws.data(frames)}", "--set", "fidelities.lo.forces_key=lo_grad")


def _single_atom(ws: Workspace) -> list[str]:
    frames = ws.labelled()
    lone = Atoms("O", positions=[[0.0, 0.0, 0.0]])
    lone.info.update(lo_energy=-2000.0, hi_energy=-2040.0)
    lone.arrays["lo_forces"] = np.zeros((1, 3))
    lone.arrays["hi_forces"] = np.zeros((1, 3))
    return ws.with_train([*frames[:2], lone, *frames[2:]])


def _too_close(atoms: Atoms) -> None:
    atoms.positions[1] = atoms.positions[0] + [0.05, 0.0, 0.0]


def _uncovered_element(atoms: Atoms) -> None:
    atoms.symbols[0] = "Cl"


def _forces_absent(ws: Workspace) -> list[str]:
    files = {split: ws.data(ws.labelled(seed=20 + k, forces=False), f"{split}.xyz") for k, split in enumerate(ws.files)}
    return ws.train(*(a for split, path in files.items() for a in ("--set", f"data.{split}={path}")))


def _forces_only_scored(ws: Workspace) -> list[str]:
    return ws.with_train(ws.labelled(forces=False))


def _empty_data(ws: Workspace) -> list[str]:
    path = ws.tmp / "empty.xyz"
    path.write_text("")
    return ws.train("--set", f"data.train={path}")


def _garbage_data(ws: Workspace) -> list[str]:
    path = ws.tmp / "garbage.xyz"
    path.write_text("this is not\nan xyz file at all\n")
    return ws.train("--set", f"data.train={path}")


def _valid_without_target(ws: Workspace) -> list[str]:
    frames = ws.labelled()
    for atoms in frames:
        del atoms.info["hi_energy"], atoms.arrays["hi_forces"]
    return ws.train("--set", f"data.valid={ws.data(frames, 'valid_no_hi.xyz')}")


def _truncated_foundation(ws: Workspace) -> list[str]:
    path = ws.tmp / "truncated.model"
    path.write_bytes(ws.model.read_bytes()[:5000])
    return ws.train("--set", f"foundation.model={path}")


def _multihead_no_head(ws: Workspace) -> list[str]:
    return ws.train("--set", f"foundation.model={ws.multihead()}")


def _multihead_wrong_head(ws: Workspace) -> list[str]:
    return ws.train("--set", f"foundation.model={ws.multihead()}", "--set", "foundation.head=mp2")


def _resume_other_recipe(ws: Workspace) -> list[str]:
    ws.fake_run()
    other = yaml.safe_load(ws.recipe().read_text())
    other["training"]["lr"] = 0.5
    (ws.out / "recipe.resolved.yaml").write_text(yaml.safe_dump(other))
    return [*ws.train(), "--resume"]


def _md_check_missing_structures(ws: Workspace) -> list[str]:
    return ["md-check", str(ws.model), str(ws.tmp / "no_such.xyz")]


def _md_check_needs_head(ws: Workspace) -> list[str]:
    return ["md-check", str(ws.multihead()), str(ws.files["test"]), "--out", str(ws.tmp / "md.json")]


def _pairs_not_from_displace(ws: Workspace) -> list[str]:
    return ws.train("--set", f"data.valid_pairs={ws.files['valid']}")


def _pairs_half_missing(ws: Workspace) -> list[str]:
    from mace_mf.data.pairs import make_pairs

    pairs = make_pairs(ws.labelled(), 2, 0.01, seed=0)
    label(pairs, "hi", 1.0, 1.2, -50.0, forces=False)
    return ws.train("--set", f"data.valid_pairs={ws.data(pairs[:3], 'pairs.xyz')}")


def _select_budget_too_large(ws: Workspace) -> list[str]:
    return ["select", str(ws.files["test"]), str(ws.tmp / "chosen.xyz"), "--budget", "100", "--model", str(ws.model)]


def _displace_bad_delta(ws: Workspace) -> list[str]:
    return ["displace", str(ws.files["valid"]), str(ws.tmp / "pairs.xyz"), "--delta", "0.5"]


def _unfinished_store(ws: Workspace) -> list[str]:
    from mace_mf.data.store import preprocess

    store = ws.tmp / "store"
    preprocess([ws.files["train"]], store, chunk=10)
    (store / "manifest.json").unlink()  # as a preprocess killed before its last step leaves it
    return ws.train("--set", f"data.train={store}")


def _changed_store_source(ws: Workspace) -> list[str]:
    from mace_mf.data.store import preprocess

    source = ws.data(ws.labelled(), "source.xyz")
    preprocess([source], ws.tmp / "store")
    ws.data(ws.labelled(seed=12), "source.xyz")  # the file the store was built from, since rewritten
    return ws.train("--set", f"data.train={ws.tmp / 'store'}")


def _preprocess_bad_geometry(ws: Workspace) -> list[str]:
    frames = ws.labelled()
    _too_close(frames[2])
    return ["preprocess", str(ws.data(frames)), "--out", str(ws.tmp / "store")]


def _export_undeclared_head(ws: Workspace) -> list[str]:
    return ["export", str(ws.multihead()), "--out", str(ws.tmp / "exported"), "--fidelity", "mp2"]


CATALOGUE: list[Case] = [
    # -- the recipe file ------------------------------------------------------------------------
    Case(
        "recipe-missing",
        "The recipe file does not exist",
        lambda ws: ["train", str(ws.tmp / "nope.yaml")],
        "nope.yaml",
        "check the path",
    ),
    Case(
        "recipe-unreadable",
        "The recipe path is a folder or cannot be read",
        lambda ws: ["train", str(ws.tmp)],
        "cannot read recipe",
        "check the path and its permissions",
    ),
    Case(
        "yaml-malformed",
        "Malformed YAML (an unclosed bracket, a bad indent)",
        lambda ws: ["train", str(ws.text_recipe("seed: [0\nname: x\n"))],
        "bad.yaml: line",
        "fix the syntax",
    ),
    Case(
        "recipe-empty",
        "An empty recipe file",
        lambda ws: ["train", str(ws.text_recipe(""))],
        "the recipe is empty",
        "see recipes/quickstart.yaml",
    ),
    Case(
        "recipe-not-mapping",
        "A recipe that is a list or a scalar, not `key: value` sections",
        lambda ws: ["train", str(ws.text_recipe("- train\n- data\n"))],
        "must be a mapping",
        "write `section: {key: value}`",
    ),
    Case(
        "duplicate-key",
        "A key (or a fidelity name) written twice",
        lambda ws: ["train", str(ws.text_recipe(ws.recipe().read_text() + "seed: 3\n"))],
        "duplicate key 'seed'",
        "may appear once",
    ),
    Case(
        "duplicate-fidelity",
        "Two fidelities with the same name",
        lambda ws: ["train", str(ws.text_recipe(ws.recipe().read_text().replace("  hi:", "  lo:")))],
        "duplicate key 'lo'",
        "may appear once",
    ),
    Case(
        "unknown-key",
        "A misspelt or foreign key (e.g. `learning_rate` from mace_run_train)",
        _set("training.learning_rate=0.01"),
        "unknown key 'training.learning_rate'",
        "did you mean 'lr'?",
    ),
    Case(
        "unknown-section",
        "A misspelt section",
        lambda ws: ws.recipe_edit(lambda t: t.update(trainig={})),
        "unknown key 'trainig'",
        "did you mean 'training'?",
    ),
    Case(
        "missing-section",
        "A required key left out (`foundation`, `fidelities`, `data`)",
        lambda ws: ws.recipe_edit(lambda t: t.pop("data")),
        "missing required key 'data'",
        "mace-mf recipe reference",
    ),
    Case(
        "wrong-type",
        "A value of the wrong type",
        _set("training.epochs=many"),
        "training.epochs",
        "expected int (default 30; see `mace-mf recipe reference`)",
    ),
    Case(
        "out-of-range",
        "A value out of its range (negative learning rate, fraction > 1)",
        _set("training.lr=-1"),
        "training.lr: Input should be greater than 0",
        "expected float (default 0.001; see `mace-mf recipe reference`)",
    ),
    Case(
        "bad-choice",
        "A value that is not one of the allowed choices",
        _set("dtype=float16"),
        "dtype",
        "'float32' or 'float64'",
    ),
    Case(
        "bad-e0s",
        "A misspelt choice inside a fidelity (`e0s: fitt`)",
        _set("fidelities.hi.e0s=fitt"),
        "fidelities.hi.e0s: Input should be 'fit' or 'foundation'",
        "see `mace-mf recipe reference`",
    ),
    Case(
        "list-expected",
        "A single value where a list is expected",
        _set("export.fidelities=hi"),
        "export.fidelities: Input should be a valid list",
        "expected list[str] | None",
    ),
    Case(
        "bad-set",
        "A `--set` without `=`",
        lambda ws: ["recipe", "check", str(ws.recipe()), "--set", "seed"],
        "--set 'seed'",
        "expected dotted.key=value",
    ),
    Case(
        "fidelity-without-keys",
        "A fidelity with neither `energy_key` nor `forces_key`",
        lambda ws: ws.recipe_edit(lambda t: t["fidelities"].update(mp2={"energy_weight": 1.0})),
        "fidelity 'mp2' has neither energy_key nor forces_key",
        "set at least one",
    ),
    Case(
        "bad-fidelity-name",
        "A fidelity name that cannot name a head or a file",
        lambda ws: ws.recipe_edit(lambda t: t["fidelities"].update({"my dft": {"energy_key": "hi_energy"}})),
        "fidelity name 'my dft' is not allowed",
        "use letters, digits, _ and -",
    ),
    Case(
        "target-undeclared",
        "`training.target` names a fidelity that is not declared",
        _set("training.target=ccsdt"),
        "training.target 'ccsdt' is not a declared fidelity",
        "use one of the declared names",
    ),
    Case(
        "export-undeclared",
        "`export.fidelities` names a fidelity that is not declared",
        _set("export.fidelities=[hi, mp2]"),
        "export.fidelities: 'mp2' is not a declared fidelity",
        "use one of the declared names",
    ),
    Case(
        "empty-file-list", "An empty list of data files", _set("data.train=[]"), "data.train", "give at least one path"
    ),
    Case(
        "no-validation",
        "No validation file and `valid_fraction: 0`",
        _set("data.valid=null", "data.valid_fraction=0"),
        "data.valid",
        "give one of them",
    ),
    Case(
        "cuda-unavailable",
        "`device: cuda` on a machine without a usable GPU",
        _set("device=cuda"),
        "device",
        "set device: cpu",
    ),
    # -- data files -----------------------------------------------------------------------------
    Case(
        "data-missing",
        "A data file that does not exist",
        _set("data.valid=missing.xyz"),
        "missing.xyz",
        "check data.* in the recipe",
    ),
    Case(
        "data-unreadable", "A data file that no ASE reader understands", _garbage_data, "garbage.xyz", "set data.format"
    ),
    Case("data-empty", "An empty data file", _empty_data, "empty.xyz", "no configurations in the file"),
    Case(
        "fidelity-no-labels",
        "A declared fidelity with no labels in any file",
        _set("fidelities.mp2.energy_key=mp2_energy"),
        "fidelities.mp2.energy_key 'mp2_energy' is in no configuration",
        "check the key",
    ),
    Case(
        "energy-key-absent",
        "An energy key that no configuration has (a typo)",
        _set("fidelities.hi.energy_key=hi_energie"),
        "fidelities.hi.energy_key 'hi_energie'",
        "set it to null",
    ),
    Case(
        "forces-key-absent",
        "A forces key that no configuration has (a typo)",
        _set("fidelities.hi.forces_key=hi_force"),
        "fidelities.hi.forces_key 'hi_force'",
        "set it to null",
    ),
    Case(
        "forces-absent-but-trained",
        "Energies present but no forces, while `forces_weight` > 0 trains on them",
        _forces_absent,
        "fidelities.lo.forces_key 'lo_forces' is in no configuration",
        "forces_weight: 0",
    ),
    Case(
        "forces-only-scored-but-trained",
        "Forces only in the validation/test files, while `forces_weight` > 0 would train on them",
        _forces_only_scored,
        "fidelities.lo.forces_key 'lo_forces' is only in the validation/test data",
        "set fidelities.lo.forces_weight: 0",
    ),
    Case(
        "nan-label",
        "A NaN energy label",
        _corrupt_frame(_nan_energy),
        "bad.xyz: configuration 2: hi_energy",
        "fix or drop the configuration",
    ),
    Case(
        "inf-label",
        "An infinite force component",
        _corrupt_frame(_inf_force),
        "bad.xyz: configuration 2: lo_forces",
        "fix or drop the configuration",
    ),
    Case(
        "label-not-number",
        "An energy label that is text",
        _corrupt_frame(_text_energy),
        "bad.xyz: configuration 2: lo_energy",
        "give one number in eV",
    ),
    Case(
        "forces-wrong-shape",
        "A forces array of the wrong shape",
        _wrong_shape,
        "bad.xyz: configuration 2: lo_grad",
        "store one x, y, z row per atom",
    ),
    Case(
        "single-atom",
        "A configuration with a single atom",
        _single_atom,
        "bad.xyz: configuration 2",
        "isolated atoms are fixed by E0s, drop it",
    ),
    Case(
        "atoms-too-close",
        "Two atoms closer than 0.1 Å",
        _corrupt_frame(_too_close),
        "bad.xyz: configuration 2: atoms 0.050 Å apart",
        "fix or drop the configuration",
    ),
    Case(
        "target-without-valid-labels",
        "The target fidelity has no labels in the validation data",
        _valid_without_target,
        "training.target: fidelity 'hi' has no labels in the validation data",
        "label it there or choose another target",
    ),
    # -- the foundation -------------------------------------------------------------------------
    Case(
        "element-not-covered",
        "Elements the foundation does not know",
        _corrupt_frame(_uncovered_element),
        "data.train: elements Cl are not covered",
        "pick a foundation that covers them",
    ),
    Case(
        "foundation-missing",
        "The foundation file does not exist",
        _set("foundation.model=nowhere.model"),
        "nowhere.model not found",
        "give a MACE .model file",
    ),
    Case(
        "foundation-truncated",
        "A truncated foundation file (an interrupted copy)",
        _truncated_foundation,
        "truncated.model is not a loadable MACE model",
        "is the file truncated?",
    ),
    Case(
        "foundation-not-mace",
        "A foundation file that is some other torch model",
        lambda ws: ws.foundation(torch.nn.Linear(2, 2)),
        "bad.model is a Linear",
        "ScaleShiftMACE",
    ),
    Case(
        "foundation-state-dict",
        "A checkpoint/state dict instead of a `.model`",
        lambda ws: ws.foundation(build_tiny_mace().state_dict()),
        "holds a state dict",
        "export a full model",
    ),
    Case(
        "foundation-unknown-name",
        "A foundation name that mace-torch does not know",
        _set("foundation.model=mace_xyz:small"),
        "'mace_xyz:small' is neither a file nor a named foundation",
        "use mace_mp:<size>",
    ),
    Case(
        "multihead-without-head",
        "A multi-head foundation without `foundation.head`",
        _multihead_no_head,
        "foundation.head",
        "choose the starting head with foundation.head",
    ),
    Case(
        "multihead-unknown-head",
        "`foundation.head` is not a head of the foundation",
        _multihead_wrong_head,
        "foundation.head: 'mp2' is not a head",
        "heads: ['pbe', 'ccsdt']",
    ),
    # -- the run folder -------------------------------------------------------------------------
    Case(
        "out-holds-run",
        "The output folder already holds a run",
        lambda ws: (ws.fake_run(), ws.train())[1],
        "already holds a run",
        "pass --resume to continue it, --overwrite to replace it",
    ),
    Case(
        "resume-nothing",
        "`--resume` where there is no run",
        lambda ws: ws.train("--resume"),
        "no run to resume here",
        "drop --resume",
    ),
    Case(
        "resume-without-out",
        "`--resume` without `--out`",
        lambda ws: ["train", str(ws.recipe()), "--resume"],
        "--resume needs --out",
        "pointing at the run folder",
    ),
    Case(
        "resume-and-overwrite",
        "`--resume` together with `--overwrite`",
        lambda ws: ws.train("--resume", "--overwrite"),
        "--resume and --overwrite",
        "choose one",
    ),
    Case(
        "resume-other-recipe",
        "Resuming with a different recipe or `--set`",
        _resume_other_recipe,
        "recipe.resolved.yaml: the recipe differs",
        "resume with the same recipe",
    ),
    # -- other commands -------------------------------------------------------------------------
    Case(
        "export-unknown-head",
        "`mace-mf export --fidelity` names no head of the model",
        _export_undeclared_head,
        "--fidelity 'mp2': not a head",
        "heads: ['pbe', 'ccsdt']",
    ),
    Case(
        "md-check-missing-structures",
        "`mace-mf md-check` on a structures file that does not exist",
        _md_check_missing_structures,
        "no_such.xyz",
        "data file not found",
    ),
    Case(
        "md-check-needs-head",
        "`mace-mf md-check` on a multi-head model without `--head`",
        _md_check_needs_head,
        "two_heads.model has heads ['pbe', 'ccsdt']",
        "choose one with --head",
    ),
    # -- displacement pairs and selection --------------------------------------------------------
    Case(
        "pairs-not-pairs",
        "`data.valid_pairs` names a file that `mace-mf displace` did not make",
        _pairs_not_from_displace,
        "valid.xyz: configuration 0: not a displacement pair",
        "make pairs with mace-mf displace",
    ),
    Case(
        "pairs-half-missing",
        "A pair whose other half was dropped from the file",
        _pairs_half_missing,
        "pairs.xyz: pair 1 has only its +1 half",
        "keep both halves",
    ),
    Case(
        "displace-bad-delta",
        "`mace-mf displace --delta` outside (0, 0.1] Å",
        _displace_bad_delta,
        "--delta 0.5",
        "0.01 is a good default",
    ),
    # -- data stores ---------------------------------------------------------------------------
    Case(
        "store-unfinished",
        "A store whose `mace-mf preprocess` was interrupted",
        _unfinished_store,
        "the store was not finished",
        "run the same mace-mf preprocess command again to complete it",
    ),
    Case(
        "store-source-changed",
        "A store whose source file has changed since it was built",
        _changed_store_source,
        "source.xyz, which has changed since",
        "mace-mf preprocess",
    ),
    Case(
        "preprocess-bad-geometry",
        "`mace-mf preprocess` meets a broken configuration",
        _preprocess_bad_geometry,
        "bad.xyz: configuration 2: atoms 0.050 Å apart",
        "fix or drop the configuration",
    ),
    Case(
        "select-budget-too-large",
        "`mace-mf select --budget` larger than the pool",
        _select_budget_too_large,
        "--budget 100: the pool holds only 8 geometries",
        "give a fraction of the pool",
    ),
]


@pytest.fixture
def workspace(tmp_path, tiny_model_file, two_fidelity_files) -> Workspace:
    return Workspace(tmp_path, tiny_model_file, two_fidelity_files)


def check_answer(code: int, err: str, case: Case) -> str:
    """The contract: exit 2, one ``error:`` line last, no traceback, names the culprit and the fix."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert case.names in errors[0], (case.names, errors[0])
    assert case.fix in errors[0], (case.fix, errors[0])
    return errors[0]


def check_nothing_looks_complete(ws: Workspace) -> None:
    """No run-shaped output: the folder is absent or empty, or (a run was there before) unchanged."""
    for name in ("metrics.json", "report.md", "models", "md_check.json", "checkpoints"):
        assert not (ws.out / name).exists(), name
    record = ws.out / "run.json"
    if record.is_file():
        assert json.loads(record.read_text()) == {"status": "complete"}  # the earlier run, untouched
    else:
        assert not ws.out.exists() or not any(ws.out.iterdir()), list(ws.out.iterdir())


def test_catalogue_is_large_and_ids_unique():
    ids = [case.id for case in CATALOGUE]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda case: case.id)
def test_bad_input_gets_one_line(case, workspace, capsys):
    if case.id == "cuda-unavailable" and torch.cuda.is_available():
        pytest.skip("a GPU is present here, so device: cuda is valid")
    argv = case.make(workspace)
    capsys.readouterr()
    code = main(argv)
    check_answer(code, capsys.readouterr().err, case)
    check_nothing_looks_complete(workspace)


SUBPROCESS_CASES = ["yaml-malformed", "foundation-truncated", "nan-label"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_console_script_prints_only_the_line(case_id, workspace):
    """As a separate process: stderr holds the line, after progress logs at most (no warnings, no traceback)."""
    case = next(c for c in CATALOGUE if c.id == case_id)
    argv = case.make(workspace)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "mace_mf.cli", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    line = check_answer(done.returncode, done.stderr, case)
    others = [text for text in done.stderr.splitlines() if text.strip() and text != line]
    # Only progress log records (and their wrapped continuations) may precede the error line.
    assert all(text.startswith(("INFO ", " ")) for text in others), done.stderr
    assert "Warning" not in done.stderr, done.stderr
    check_nothing_looks_complete(workspace)


def test_old_format_pickle_is_upgraded_in_memory_and_said_so(tmp_path, caplog):
    """A 2022-era pickle (float r_max, list atomic_numbers, no num_interactions) loads, with a warning."""
    from mace_mf.model.foundation import load_foundation

    old = build_tiny_mace()
    del old.r_max, old.atomic_numbers  # buffers now; 2022 pickles held plain Python values
    old.r_max = 4.0
    old.atomic_numbers = [1, 6, 7, 8]
    del old.num_interactions
    path = tmp_path / "old.model"
    torch.save(old, path)
    with caplog.at_level("WARNING", logger="mace_mf"):
        model, info = load_foundation(str(path), None, torch.float64)
    assert "old MACE pickle, upgraded in memory" in caplog.text
    assert info.upgraded and info.r_max == 4.0 and int(model.num_interactions) == 2
    assert isinstance(torch.load(path, weights_only=False).r_max, float)


def test_published_2022_pickle_is_upgraded_in_memory(caplog):
    """The real thing: SPICE-small as published in 2022, which stock MACECalculator cannot run."""
    from support import SHARED

    from mace_mf.model.foundation import load_foundation

    path = SHARED / "models" / "spice_small_2022_original.model"
    if not path.is_file():
        pytest.skip(f"{path} absent (../shared is only on the development machines)")
    with caplog.at_level("WARNING", logger="mace_mf"):
        _, info = load_foundation(str(path), None, torch.float64)
    assert "r_max became a tensor" in caplog.text and info.upgraded


def troubleshooting_markdown() -> str:
    """The README's Troubleshooting table, generated from the catalogue."""
    lines = ["| problem | the error line names | and says |", "|---|---|---|"]
    for case in CATALOGUE:
        names = case.names.replace("|", "\\|")
        fix = case.fix.replace("|", "\\|")
        lines.append(f"| {case.problem} | `{names}` | `{fix}` |")
    return "\n".join(lines)


def test_readme_troubleshooting_matches_the_catalogue():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- troubleshooting:start -->" in readme, "README lacks the Troubleshooting block"
    block = readme.split("<!-- troubleshooting:start -->")[1].split("<!-- troubleshooting:end -->")[0]
    assert block.strip() == troubleshooting_markdown().strip(), "regenerate with `python tests/test_bad_input.py`"


if __name__ == "__main__":
    print(troubleshooting_markdown())
