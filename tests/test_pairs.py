"""Force validation from energies alone: displacement pairs and their estimate (the bench deciding on
them, as the README tells it: tests/test_readme.py)."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase.calculators.morse import MorsePotential
from support import label, sample_molecules, write_recipe

from mace_mf.cli import main
from mace_mf.config.loading import load_recipe
from mace_mf.config.schema import FidelitySpec
from mace_mf.data.pairs import PAIR_DIRECTION, make_pairs, read_pairs
from mace_mf.workflows.run import train_run
from mace_mf.workflows.sweep import pairs_fallback, trial_metric

HI = {"hi": FidelitySpec(energy_key="hi_energy", forces_key=None)}


def test_pairs_are_seeded_unit_displacements_that_keep_charge_and_drop_labels():
    frames = sample_molecules(5, seed=4)
    label(frames, "hi", 1.0, 1.2, -50.0)
    frames[2].info["charge"] = 1
    pairs = make_pairs(frames, n=7, delta=0.01, seed=3)
    assert len(pairs) == 14
    assert [a.info["pair_id"] for a in pairs] == [i // 2 for i in range(14)]
    assert [a.info["pair_sign"] for a in pairs] == [1, -1] * 7
    sources = [a.info["pair_source"] for a in pairs[::2]]
    assert sorted(set(sources[:5])) == [0, 1, 2, 3, 4]  # every geometry once before any twice
    for plus, minus in zip(pairs[::2], pairs[1::2], strict=True):
        u = plus.arrays[PAIR_DIRECTION]
        assert np.linalg.norm(u) == pytest.approx(1.0)
        np.testing.assert_allclose(plus.positions - minus.positions, 0.02 * u, atol=1e-12)
        base = frames[plus.info["pair_source"]]
        np.testing.assert_allclose(0.5 * (plus.positions + minus.positions), base.positions, atol=1e-12)
        assert "hi_energy" not in plus.info and "hi_forces" not in plus.arrays
        assert plus.info.get("charge") == base.info.get("charge")
    again = make_pairs(frames, n=7, delta=0.01, seed=3)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(pairs, again, strict=True))
    assert not np.array_equal(make_pairs(frames, 7, 0.01, seed=4)[0].positions, pairs[0].positions)


def test_finite_difference_of_pair_energies_is_the_force_along_the_direction(tmp_path):
    """Morse energies on the pairs: −(E+ − E−)/2δ is F·u of the Morse forces at the centre, up to a
    truncation error that falls as δ² (this Morse potential is stiff: far larger third derivatives
    than a molecule's, so the error at δ = 0.01 Å is larger here than the docs' 1.4 meV/Å)."""
    frames = sample_molecules(6, seed=5)
    calc = MorsePotential(epsilon=1.0, r0=1.2, rho0=6.0)
    worst = {}
    for delta in (0.01, 0.002):
        pairs = make_pairs(frames, n=6, delta=delta, seed=0)
        label(pairs, "hi", 1.0, 1.2, -50.0, forces=False)
        ase.io.write(tmp_path / "pairs.xyz", pairs)
        read = read_pairs(str(tmp_path / "pairs.xyz"), HI, None)
        errors = []
        for centre, u, ref in zip(read.centres, read.directions, read.reference[:, 0], strict=True):
            calc.calculate(centre, ["forces"])
            errors.append(ref - float((calc.results["forces"] * u).sum()))
        worst[delta] = float(np.abs(errors).max())
    assert worst[0.002] < 1e-3  # eV/Å
    assert 15 < worst[0.01] / worst[0.002] < 35  # δ²: 25
    assert read.geometries == 6 and read.weights.tolist() == [3.0 * len(a) for a in read.centres]


def test_displace_command_writes_pairs_and_never_overwrites(tmp_path, capsys):
    ase.io.write(tmp_path / "valid.xyz", sample_molecules(4, seed=1))
    args = ["displace", str(tmp_path / "valid.xyz"), str(tmp_path / "pairs.xyz"), "--n", "3"]
    assert main(args) == 0
    assert len(ase.io.read(tmp_path / "pairs.xyz", ":")) == 6
    assert "--energies-only" in capsys.readouterr().err
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--delta", "0.5"]) == 2
    assert "--delta 0.5" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hidden_forces_data(tmp_path_factory):
    """Two fidelities; the high level's validation forces are absent, its validation pairs labelled."""
    folder = tmp_path_factory.mktemp("pairs-data")
    paths = {}
    for split, n, seed in (("train", 24, 1), ("valid", 8, 2), ("test", 8, 3)):
        frames = sample_molecules(n, seed)
        label(frames, "lo", 0.9, 1.25, -10.0)
        label(frames, "hi", 1.0, 1.2, -50.0, forces=split != "valid")
        paths[split] = folder / f"{split}.xyz"
        ase.io.write(paths[split], frames, format="extxyz")
    pairs = make_pairs(ase.io.read(paths["valid"], ":"), n=64, delta=0.01, seed=0)
    label(pairs, "hi", 1.0, 1.2, -50.0, forces=False)
    paths["pairs"] = folder / "pairs.xyz"
    ase.io.write(paths["pairs"], pairs, format="extxyz")
    with_forces = sample_molecules(8, 2)
    label(with_forces, "hi", 1.0, 1.2, -50.0)
    paths["valid_with_forces"] = folder / "valid_forces.xyz"
    ase.io.write(paths["valid_with_forces"], with_forces, format="extxyz")
    return paths


def test_a_run_scores_its_heads_on_the_pairs_and_the_estimate_tracks_the_force_rmse(
    tmp_path, tiny_model_file, hidden_forces_data
):
    files = {k: hidden_forces_data[k] for k in ("train", "valid", "test")}
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, files, epochs=2)
    recipe = load_recipe(recipe_file, [f"data.valid_pairs={hidden_forces_data['pairs']}"])
    out = train_run(recipe, tmp_path / "run", recipe_file)
    valid = json.loads((out / "metrics.json").read_text())["valid"]
    assert valid["hi"]["f_rmse_meV_A"] is None and valid["hi"]["n_pairs"] == 64
    assert valid["lo"]["n_pairs"] == 0 and valid["lo"]["fd_rmse_meV_A"] is None  # no lo energies on the pairs
    hi = valid["hi"]
    assert hi["fd_rmse_lo_meV_A"] < hi["fd_rmse_meV_A"] < hi["fd_rmse_hi_meV_A"] and hi["fd_pairs_for_5pct"] > 64
    record = json.loads((out / "pair_errors.json").read_text())
    errors = np.array(record["errors_meV_A"]["hi"])
    weights = np.array(record["weights"])
    assert valid["hi"]["fd_rmse_meV_A"] == pytest.approx(np.sqrt((weights * errors**2).sum() / weights.sum()))
    assert "F·u RMSE, pairs" in (out / "report.md").read_text() and "pairs for ±5 %" in (out / "report.md").read_text()
    # the same model scored on the true forces of the same geometries: the pairs estimate it
    code = main(
        [
            *("eval", str(out), str(hidden_forces_data["valid_with_forces"])),
            *("--pairs", str(hidden_forces_data["pairs"]), "--json", str(tmp_path / "eval.json")),
        ]
    )
    assert code == 0
    scored = json.loads((tmp_path / "eval.json").read_text())["hi"]
    assert scored["fd_rmse_meV_A"] == pytest.approx(valid["hi"]["fd_rmse_meV_A"], rel=1e-9)
    assert scored["fd_rmse_meV_A"] == pytest.approx(scored["f_rmse_meV_A"], rel=0.2)
    # a sweep ranking on validation forces reads the pairs where no force label exists
    assert pairs_fallback("valid/hi/f_rmse_meV_A") == "final/valid/hi/fd_rmse_meV_A"
    assert trial_metric(out, "valid/hi/f_rmse_meV_A", "minimize") == (
        valid["hi"]["fd_rmse_meV_A"],
        "final/valid/hi/fd_rmse_meV_A",
    )


def test_the_pairs_estimate_carries_a_bootstrap_interval_that_narrows_as_one_over_root_pairs():
    """Gaussian force errors: (ΔF·u)² scatters like σ²χ²₁, so the RMSE estimate from n pairs has a
    relative standard error of 1/sqrt(2n), a 95 % half-width of 1.96/sqrt(2n), and ±5 % takes
    (1.96/0.05)²/2 ≈ 768 pairs whatever n the interval was measured on."""
    from mace_mf.evaluation.pairs import rmse_interval

    rng = np.random.default_rng(0)
    for n in (100, 400):
        squared = (0.3 * rng.normal(size=n)) ** 2
        weights = np.full(n, 27.0)
        low, high, needed = rmse_interval(squared, weights)
        centre = np.sqrt(squared.mean())
        assert low < centre < high and low < 0.3 < high
        assert (high - low) / 2 / centre == pytest.approx(1.96 / np.sqrt(2 * n), rel=0.25)
        assert needed == pytest.approx(768, rel=0.4)
