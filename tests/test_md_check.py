"""``mace-mf md-check``: a stable model passes, broken ones fail for the right reason."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.lj import LennardJones
from support import DEMO

from mace_mf.cli import main
from mace_mf.config.schema import MDOptions
from mace_mf.evaluation.md_check import bonded_pairs, run_structure


@pytest.fixture(scope="module")
def water(tmp_path_factory):
    """One demo test geometry (3 atoms keeps the MD cheap)."""
    frames = [a for a in ase.io.read(DEMO / "test.xyz", ":") if len(a) == 3][:1]
    path = tmp_path_factory.mktemp("md") / "water.xyz"
    ase.io.write(path, frames)
    return path


def test_pretrained_demo_foundation_is_stable(water, tmp_path, capsys):
    out = tmp_path / "md_check.json"
    code = main(["md-check", str(DEMO / "foundation.model"), str(water), "--steps", "80", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["passed"] and record["summary"].startswith("md-check PASS: 1/1")
    (s,) = record["structures"]
    assert s["steps_run"] == 80 and s["finite"] and not s["flown_apart"]
    assert abs(s["drift_eV_atom_ps"]) < 0.01 and s["max_bond_stretch"] < 0.3
    assert "md-check PASS" in capsys.readouterr().err


def test_inverted_energy_surface_fails(water, tmp_path, capsys):
    """Flip the sign of the learned interaction energy: the molecule is torn apart, md-check says FAIL."""
    model = torch.load(DEMO / "foundation.model", weights_only=False)
    with torch.no_grad():
        model.scale_shift.scale.mul_(-3.0)
    broken = tmp_path / "broken.model"
    torch.save(model, broken)
    out = tmp_path / "md_check.json"
    code = main(["md-check", str(broken), str(water), "--steps", "60", "--dt", "1.0", "--out", str(out)])
    assert code == 1
    record = json.loads(out.read_text())
    assert not record["passed"] and record["summary"].startswith("md-check FAIL: 1/1")
    reasons = " ".join(record["structures"][0]["reasons"])
    assert "force" in reasons or "bond stretched" in reasons or "apart" in reasons
    assert record["structures"][0]["steps_run"] < 60  # stopped at the failure
    assert "md-check FAIL" in capsys.readouterr().err


def test_too_large_a_time_step_shows_as_energy_drift(water):
    """Same stable model, 4 fs steps with hydrogens: velocity Verlet no longer conserves energy."""
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(DEMO / "foundation.model"), device="cpu", default_dtype="float64")
    atoms = ase.io.read(water)
    gentle = run_structure(atoms, calc, 5.0, MDOptions(steps=40, dt_fs=0.25), 0)
    rough = run_structure(atoms, calc, 5.0, MDOptions(steps=40, dt_fs=4.0), 0)
    assert rough.max_energy_change_eV_atom > 10 * gentle.max_energy_change_eV_atom


@pytest.mark.parametrize("seed,reason", [(0, "flew out of the cutoff"), (1, "Å apart (limit 0.5 Å)")])
def test_atoms_leaving_the_cutoff_or_colliding_are_reported(seed, reason):
    """A nearly non-interacting hot pair: depending on its velocities it separates or collides."""
    pair = Atoms("H2", positions=[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    options = MDOptions(steps=200, dt_fs=1.0, temperature_K=3000.0)
    result = run_structure(pair, LennardJones(sigma=0.5, epsilon=1e-4, rc=10.0), 1.5, options, 0, seed)
    assert not result.passed and result.steps_run < 200
    assert any(reason in r for r in result.reasons), result.reasons
    assert (result.flown_apart == [0, 1]) == (seed == 0)


def test_bonded_pairs_of_the_starting_geometry():
    i, j, d = bonded_pairs(molecule("CH3OH"))
    atoms = molecule("CH3OH")
    pairs = sorted("".join(sorted(atoms[a].symbol + atoms[b].symbol)) for a, b in zip(i, j, strict=True))
    assert pairs == sorted(["CO", "CH", "CH", "CH", "HO"])
    np.testing.assert_allclose(d, [atoms.get_distance(a, b) for a, b in zip(i, j, strict=True)])
