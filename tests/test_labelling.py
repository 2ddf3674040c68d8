"""`mace-mf label`: labels equal the calculator's own, a killed run resumes, failures are skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.morse import MorsePotential
from ase.calculators.singlepoint import SinglePointCalculator
from support import ROOT

from mace_mf.cli import main
from mace_mf.errors import LabelError
from mace_mf.labels.calculators import parse_calc_kwargs, parse_calculator_spec
from mace_mf.labels.charge import charge_and_multiplicity
from mace_mf.labels.labelling import failures_path, label_file, label_recipe_data, partial_path

pytest.importorskip("tblite")
from tblite.ase import TBLite

TESTS = Path(__file__).resolve().parent


def ethanols(n: int, seed: int = 0) -> list[Atoms]:
    """Rattled ethanol molecules with a reference label attached as calculator results (like MD17 files)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.info["config_id"] = i
        atoms.info["ref_energy"] = -1000.0 - i
        atoms.calc = SinglePointCalculator(atoms, energy=-4200.0 - i, forces=np.full((len(atoms), 3), 0.01 * i))
        frames.append(atoms)
    return frames


def direct(atoms: Atoms, method: str, charge: int = 0, multiplicity: int = 1) -> tuple[float, np.ndarray]:
    """tblite's own ASE calculator, built as its documentation shows."""
    work = Atoms(atoms.numbers, atoms.positions)
    work.calc = TBLite(method=method, charge=charge, multiplicity=multiplicity, verbosity=0)
    return work.get_potential_energy(), work.get_forces()


@pytest.mark.parametrize("method,workers", [("GFN2-xTB", 2), ("GFN1-xTB", 1)])
def test_xtb_labels_equal_tblite_called_directly_and_keep_existing_labels(tmp_path, method, workers):
    frames = ethanols(4)
    radical = molecule("CH3")  # 9 electrons: a doublet by default
    cation = molecule("CH3OH")
    cation.info["charge"] = 1  # 17 electrons: doublet
    triplet = molecule("H2O")
    triplet.info["multiplicity"] = 3
    frames += [radical, cation, triplet]
    ase.io.write(tmp_path / "in.xyz", frames, format="extxyz")
    frames = ase.io.read(tmp_path / "in.xyz", ":")  # the geometries as written (8 decimals)
    spec = parse_calculator_spec(method.lower())
    report = label_file(tmp_path / "in.xyz", tmp_path / "out.xyz", spec, "xtb_energy", "xtb_forces", workers=workers)
    assert (report.total, report.labelled, report.failures) == (7, 7, [])
    out = ase.io.read(tmp_path / "out.xyz", ":")
    expected = [(0, 1)] * 4 + [(0, 2), (1, 2), (0, 3)]
    for atoms, written, (charge, multiplicity) in zip(frames, out, expected, strict=True):
        energy, forces = direct(atoms, method, charge, multiplicity)
        assert written.info["xtb_energy"] == pytest.approx(energy, abs=1e-8)
        np.testing.assert_allclose(written.arrays["xtb_forces"], forces, atol=1e-8, rtol=0)
    # Everything that was there stays: info keys and the calculator results of the input.
    for atoms, written in zip(frames[:4], out[:4], strict=True):
        assert written.info["ref_energy"] == atoms.info["ref_energy"]
        assert written.get_potential_energy() == atoms.get_potential_energy()
        np.testing.assert_allclose(written.get_forces(), atoms.get_forces())
    # Spin states matter: the triplet is not the singlet.
    assert abs(out[-1].info["xtb_energy"] - direct(frames[-1], method)[0]) > 0.1
    assert not partial_path(tmp_path / "out.xyz").exists()


def test_charge_and_spin_keys_of_atoms_info():
    water = molecule("H2O")
    assert charge_and_multiplicity(water) == (0, 1)
    water.info.update(charge=1)
    assert charge_and_multiplicity(water) == (1, 2)
    water.info.update(uhf=1, spin=2)
    assert charge_and_multiplicity(water) == (1, 2)
    water.info.update(multiplicity=4)
    with pytest.raises(ValueError, match="disagree"):
        charge_and_multiplicity(water)
    methyl = molecule("CH3")
    methyl.info["multiplicity"] = 1
    with pytest.raises(ValueError, match="impossible with 9 electrons"):
        charge_and_multiplicity(methyl)
    assert charge_and_multiplicity(molecule("CH3"), {"multiplicity": 4}) == (0, 4)


def test_existing_labels_are_refused_in_one_line_unless_asked(tmp_path, capsys):
    frames = ethanols(3)
    frames[1].info["xtb_energy"] = 1.0
    ase.io.write(tmp_path / "in.xyz", frames, format="extxyz")
    frames = ase.io.read(tmp_path / "in.xyz", ":")
    args = ["label", str(tmp_path / "in.xyz"), str(tmp_path / "out.xyz"), "--fidelity", "xtb"]
    assert main([*args, "--calculator", "gfn2-xtb"]) == 2
    message = capsys.readouterr().err.strip()
    assert "configuration 1 already has 'xtb_energy'" in message and "--overwrite-labels" in message
    assert len(message.splitlines()) == 1 and not (tmp_path / "out.xyz").exists()
    assert main([*args, "--calculator", "gfn2-xtb", "--overwrite-labels"]) == 0
    written = ase.io.read(tmp_path / "out.xyz", ":")
    assert written[1].info["xtb_energy"] == pytest.approx(direct(frames[1], "GFN2-xTB")[0], abs=1e-8)
    assert main([*args, "--calculator", "gfn2-xtb", "--overwrite-labels"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_a_killed_run_resumes_where_it_stopped_and_matches_a_clean_run(tmp_path):
    frames = ethanols(24, seed=1)
    ase.io.write(tmp_path / "in.xyz", frames, format="extxyz")
    output = tmp_path / "out.xyz"
    command = [
        *(sys.executable, "-m", "mace_mf.cli", "label", str(tmp_path / "in.xyz"), str(output)),
        *("--fidelity", "xtb", "--calculator", "label_calculators:SlowGFN2", "--calc-kwargs", "delay=0.05"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    partial = partial_path(output)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = partial.read_text().count("\n") if partial.exists() else 0
        if lines >= 6:  # header + at least 5 results
            break
        assert process.poll() is None, "the labelling run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its workers, as an OOM kill or a lost node would
    process.wait()
    cached = partial.read_text().count("\n") - 1
    assert 5 <= cached < 24 and not output.exists()

    spec = parse_calculator_spec("label_calculators:SlowGFN2", {"delay": 0.05})
    with pytest.raises(LabelError, match="pass --resume"):
        label_file(tmp_path / "in.xyz", output, spec, "xtb_energy", "xtb_forces", progress=False)
    other = parse_calculator_spec("label_calculators:SlowGFN2", {"delay": 0.0})
    with pytest.raises(LabelError, match="different kwargs"):
        label_file(tmp_path / "in.xyz", output, other, "xtb_energy", "xtb_forces", resume=True, progress=False)
    report = label_file(tmp_path / "in.xyz", output, spec, "xtb_energy", "xtb_forces", resume=True, progress=False)
    assert report.reused >= cached and report.labelled == 24

    clean = label_file(
        tmp_path / "in.xyz", tmp_path / "clean.xyz", parse_calculator_spec("gfn2-xtb"), "xtb_energy", "xtb_forces"
    )
    assert clean.reused == 0
    for resumed, fresh in zip(ase.io.read(output, ":"), ase.io.read(tmp_path / "clean.xyz", ":"), strict=True):
        assert resumed.info["xtb_energy"] == fresh.info["xtb_energy"]
        np.testing.assert_array_equal(resumed.arrays["xtb_forces"], fresh.arrays["xtb_forces"])
        assert resumed.info["config_id"] == fresh.info["config_id"]


def test_failing_configurations_are_reported_and_skipped(tmp_path, capsys):
    frames = ethanols(5)
    frames[1].positions[1] = frames[1].positions[0]  # two atoms on one spot: tblite refuses the geometry
    frames[3].info["multiplicity"] = 2  # impossible for 26 electrons
    ase.io.write(tmp_path / "in.xyz", frames, format="extxyz")
    output = tmp_path / "out.xyz"
    code = main(["label", str(tmp_path / "in.xyz"), str(output), "--fidelity", "xtb", "--calculator", "gfn2-xtb"])
    assert code == 0
    err = capsys.readouterr().err
    assert "3/5 labelled, 2 failed" in err and "configuration 1:" in err
    written = ase.io.read(output, ":")
    assert len(written) == 5  # failed configurations stay, without the new labels (masked in training)
    assert [("xtb_energy" in a.info, "xtb_forces" in a.arrays) for a in written] == [
        (True, True),
        (False, False),
        (True, True),
        (False, False),
        (True, True),
    ]
    assert written[1].get_potential_energy() == -4201.0  # the reference label of the input stays
    rows = failures_path(output).read_text().splitlines()
    assert rows[0] == "index\treason" and [r.split("\t")[0] for r in rows[1:]] == ["1", "3"]
    assert "too close" in rows[1].lower() and "multiplicity 2 impossible" in rows[2]


def test_a_crashing_worker_costs_only_its_configuration(tmp_path):
    frames = ethanols(6)
    frames[2].info["fail"] = "exit"
    frames[4].info["fail"] = "raise"
    ase.io.write(tmp_path / "in.xyz", frames, format="extxyz")
    frames = ase.io.read(tmp_path / "in.xyz", ":")
    spec = parse_calculator_spec("label_calculators:MarkedMorse", {"epsilon": 0.5, "r0": 1.3, "rho0": 5.0})
    report = label_file(tmp_path / "in.xyz", tmp_path / "out.xyz", spec, "m_energy", "m_forces", progress=False)
    assert dict(report.failures).keys() == {2, 4}
    assert "worker process died" in dict(report.failures)[2]
    assert "RuntimeError: marked configuration refused" in dict(report.failures)[4]
    calc = MorsePotential(epsilon=0.5, r0=1.3, rho0=5.0)
    for i, atoms in enumerate(ase.io.read(tmp_path / "out.xyz", ":")):
        if i in (2, 4):
            assert "m_energy" not in atoms.info
            continue
        assert atoms.info["m_energy"] == pytest.approx(calc.get_potential_energy(frames[i]), abs=1e-10)
        np.testing.assert_allclose(atoms.arrays["m_forces"], calc.get_forces(frames[i]), atol=1e-8)


def test_mace_pseudo_labels_equal_the_stock_calculator(tmp_path, tiny_model_file):
    from mace.calculators import MACECalculator

    frames = ethanols(3)
    ase.io.write(tmp_path / "in.xyz", frames, format="extxyz")
    frames = ase.io.read(tmp_path / "in.xyz", ":")
    spec = parse_calculator_spec(f"mace:{tiny_model_file}")
    label_file(tmp_path / "in.xyz", tmp_path / "out.xyz", spec, "fm_energy", "fm_forces", progress=False)
    calc = MACECalculator(model_paths=str(tiny_model_file), device="cpu", default_dtype="float64")
    for atoms, written in zip(frames, ase.io.read(tmp_path / "out.xyz", ":"), strict=True):
        assert written.info["fm_energy"] == pytest.approx(calc.get_potential_energy(atoms), abs=1e-8)
        np.testing.assert_allclose(written.arrays["fm_forces"], calc.get_forces(atoms), atol=1e-8)
    with pytest.raises(LabelError, match="no head 'dft'"):
        label_file(tmp_path / "in.xyz", tmp_path / "o2.xyz", parse_calculator_spec(f"mace:{tiny_model_file}:dft"),
                   "fm_energy", "fm_forces", progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("gfn3-xtb", "unknown calculator; use gfn2-xtb"),
        ("mace:/no/such.model", "model file /no/such.model not found"),
        ("no_such_module:Calc", "cannot import no_such_module"),
        ("ase.calculators.morse:NoSuch", "has no class NoSuch"),
    ],
)
def test_bad_calculator_specs_are_one_line_errors(tmp_path, capsys, spec, expected):
    ase.io.write(tmp_path / "in.xyz", ethanols(1), format="extxyz")
    code = main(["label", str(tmp_path / "in.xyz"), str(tmp_path / "o.xyz"), "--fidelity", "x", "--calculator", spec])
    message = capsys.readouterr().err.strip()
    assert code == 2 and expected in message and len(message.splitlines()) == 1


def test_calc_kwargs_accept_json_and_key_value_pairs():
    assert parse_calc_kwargs(['{"accuracy": 0.1, "solvation": ["alpb", "water"]}', "verbosity=0", "x=[1, 2]"]) == {
        "accuracy": 0.1,
        "solvation": ["alpb", "water"],
        "verbosity": 0,
        "x": [1, 2],
    }
    with pytest.raises(LabelError, match="key=value"):
        parse_calc_kwargs(["accuracy"])


def test_a_recipe_labels_its_data_on_the_fly_trains_and_reuses_the_cache(
    tmp_path, tiny_model_file, two_fidelity_files, caplog
):
    import yaml
    from support import write_recipe

    from mace_mf.config.loading import load_recipe
    from mace_mf.workflows.run import train_run

    path = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    tree = yaml.safe_load(path.read_text())
    tree["fidelities"] = {"gfn2": {"labels": {"calculator": "gfn2-xtb", "workers": 2}}, **tree["fidelities"]}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    recipe = load_recipe(path)
    gfn2 = recipe.fidelities["gfn2"]
    assert (gfn2.energy_key, gfn2.forces_key) == ("gfn2_energy", "gfn2_forces")

    with caplog.at_level("INFO", logger="mace_mf"):
        out = train_run(recipe, tmp_path / "runs" / "first")
    assert "labels gfn2 (gfn2-xtb): 40 configurations, 40 computed" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["gfn2"]["n_f"] == 8 and metrics["train"]["gfn2"]["n_e"] > 0
    record = json.loads((out / "run.json").read_text())
    cached = Path(record["labelled_files"]["gfn2"]["test"][0])
    assert cached.parent == tmp_path / "runs" / "label-cache"
    source = ase.io.read(two_fidelity_files["test"], ":")
    for atoms, labelled in zip(source, ase.io.read(cached, ":"), strict=True):
        assert labelled.info["gfn2_energy"] == pytest.approx(direct(atoms, "GFN2-xTB")[0], abs=1e-8)
        assert labelled.info["hi_energy"] == atoms.info["hi_energy"]  # the data's own labels travel along
    assert str(two_fidelity_files["test"]) in (out / "recipe.resolved.yaml").read_text()  # the recipe as written

    caplog.clear()  # a second run finds every file in the cache (what train_run calls before reading data)
    with caplog.at_level("INFO", logger="mace_mf"):
        again, files = label_recipe_data(recipe, tmp_path / "runs" / "label-cache")
    assert "40 configurations, 0 computed in 0.0 s, 40 reused" in caplog.text
    assert files == record["labelled_files"] and again.data.test == str(cached)


def test_foundation_labels_name_the_recipes_own_foundation_file(tmp_path, tiny_model_file, two_fidelity_files):
    import yaml
    from support import write_recipe

    from mace_mf.config.loading import load_recipe
    from mace_mf.labels.labelling import resolve_label_calculator

    path = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files)
    recipe = load_recipe(path)
    assert resolve_label_calculator(recipe, "foundation") == f"mace:{tiny_model_file}"
    assert resolve_label_calculator(recipe, "gfn1-xtb") == "gfn1-xtb"
    tree = yaml.safe_load(path.read_text())
    tree["foundation"] = {"model": "mace_off:small"}
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(LabelError, match=r"needs a local foundation\.model file"):
        resolve_label_calculator(load_recipe(path), "foundation")
