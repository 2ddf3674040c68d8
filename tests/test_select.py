"""Choosing the geometries that get high-level labels: `mace-mf select` and `label_selection`."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from support import build_tiny_mace, label, sample_molecules, write_recipe

from mace_mf.cli import main
from mace_mf.config.loading import load_recipe
from mace_mf.data.selection import budget_count, cluster_centres, descriptors, farthest_points, select
from mace_mf.data.splits import select_data
from mace_mf.model.foundation import load_foundation


def test_farthest_points_cover_every_cluster_before_repeating_one():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 20]], dtype=float)
    points = np.concatenate([c + 0.1 * rng.normal(size=(30, 2)) for c in centres])  # one dense cloud each
    picked = farthest_points(points, 5, seed=3)
    assert sorted(i // 30 for i in picked) == [0, 1, 2, 3, 4]
    assert farthest_points(points, 5, seed=3) == picked
    assert len(set(farthest_points(points, 40, seed=1))) == 40


def test_kmeans_takes_one_typical_geometry_per_cluster_where_fps_takes_outliers():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    points = np.concatenate([c + 0.3 * rng.normal(size=(40, 2)) for c in centres])
    points = np.concatenate([points, [[30.0, 30.0]]])  # one outlier, index 160
    ranking = cluster_centres(points, 4, seed=0)
    assert sorted(ranking) == list(range(161))  # a ranking of the whole pool
    picked = ranking[:4]
    assert 160 not in picked and sorted(i // 40 for i in picked) == [0, 1, 2, 3]
    for i in picked:  # each pick sits near its cloud's centre (the outlier pulls one a little), not at its edge
        assert np.linalg.norm(points[i] - centres[i // 40]) < 0.6
    assert 160 in farthest_points(points, 4, seed=0)
    assert cluster_centres(points, 4, seed=0) == ranking


def test_descriptors_are_invariant_to_rotation_translation_and_atom_order():
    model = build_tiny_mace()
    frames = sample_molecules(4, seed=2)
    moved = []
    for i, atoms in enumerate(frames):
        other = atoms.copy()
        other.positions = Rotation.random(random_state=i).apply(other.positions) + np.array([1.0, -2.0, 0.5])
        order = np.random.default_rng(i).permutation(len(other))
        moved.append(other[order])
    a, b = descriptors(model, frames), descriptors(model, moved)
    assert a.shape[0] == 4 and a.shape[1] > 0
    np.testing.assert_allclose(a, b, atol=1e-9)
    assert not np.allclose(a[0], a[1])  # different molecules, different descriptors


def test_budget_is_a_fraction_below_one_and_a_count_from_one():
    assert budget_count(0.2, 100) == 20 and budget_count(7, 100) == 7
    for bad in (0, -1, 1000):
        with pytest.raises(Exception, match="--budget"):
            budget_count(bad, 100)


def test_select_command_writes_the_choice_in_pool_order_and_the_rest(tmp_path, tiny_model_file, capsys):
    frames = sample_molecules(20, seed=6)
    label(frames, "lo", 0.9, 1.25, -10.0)
    ase.io.write(tmp_path / "pool.xyz", frames)
    out, rest = tmp_path / "chosen.xyz", tmp_path / "rest.xyz"
    args = ["select", str(tmp_path / "pool.xyz"), str(out), "--budget", "0.25", "--model", str(tiny_model_file)]
    assert main([*args, "--rest", str(rest)]) == 0
    assert "5 of 20 geometries" in capsys.readouterr().err
    chosen, others = ase.io.read(out, ":"), ase.io.read(rest, ":")
    indices = [a.info["pool_index"] for a in chosen]
    assert indices == sorted(indices) and len(others) == 15
    assert {a.info["selection_rank"] for a in chosen} == set(range(5))
    for atoms in chosen:  # a chosen geometry is the pool's, labels included
        np.testing.assert_allclose(atoms.positions, frames[atoms.info["pool_index"]].positions, atol=1e-6)
        np.testing.assert_allclose(
            atoms.arrays["lo_forces"], frames[atoms.info["pool_index"]].arrays["lo_forces"], atol=1e-6
        )
    pool = ase.io.read(tmp_path / "pool.xyz", ":")  # what select reads: positions as the file rounds them
    expected = select(pool, 5, "kmeans", 0, torch.load(tiny_model_file, weights_only=False))
    assert sorted(expected) == indices and {a.info["selection"] for a in chosen} == {"kmeans"}  # the default
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--method", "disagreement"]) == 2
    assert "--forces-key" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--method", "disagreement", "--forces-key", "lo_forces"]) == 0
    assert main([*args, "--overwrite", "--method", "random"]) == 0  # a model is allowed, not needed


def test_recipe_keeps_high_labels_exactly_where_select_would_put_them(tmp_path, tiny_model_file, two_fidelity_files):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files)
    chosen = {}
    for method in ("random", "fps", "kmeans", "disagreement"):
        recipe = load_recipe(
            recipe_file, ["fidelities.hi.label_fraction=0.25", f"fidelities.hi.label_selection={method}"]
        )

        foundation, info = load_foundation(recipe.foundation.model, None, torch.float64)
        train = select_data(recipe, info, foundation).train
        chosen[method] = np.flatnonzero(train.energy_mask[:, 1]).tolist()
        assert len(chosen[method]) == 6 and train.energy_mask[:, 0].all()  # lo everywhere
    atoms = [a for a in ase.io.read(two_fidelity_files["train"], ":")]
    assert chosen["fps"] == sorted(select(atoms, 6, "fps", 0, foundation))
    assert chosen["kmeans"] == sorted(select(atoms, 6, "kmeans", 0, foundation))
    lo_forces = [a.arrays["lo_forces"] for a in atoms]
    assert chosen["disagreement"] == sorted(select(atoms, 6, "disagreement", 0, foundation, lo_forces))
    assert len({tuple(v) for v in chosen.values()}) == 4
    resolved = json.loads(json.dumps(recipe.model_dump(mode="json")))
    assert resolved["fidelities"]["hi"]["label_selection"] == "disagreement"


def test_chosen_compositions_resolve_every_reference_energy():
    from mace_mf.data.selection import cover_compositions

    # H, C, N, O counts: H2O2, N2O, H2O2 again, HCO, CH3NO2 (a method ranked them in this order)
    counts = np.array([[2, 0, 0, 2], [0, 0, 2, 1], [2, 0, 0, 2], [1, 1, 0, 1], [3, 1, 1, 2]], dtype=float)
    picks = cover_compositions(counts, [0, 1, 2, 3, 4], 4)
    assert sorted(picks) == [0, 1, 3, 4]  # the repeated H2O2 gave way to CH3NO2
    assert np.linalg.matrix_rank(counts[picks]) == 4
    assert cover_compositions(counts, [3, 4, 1, 0, 2], 4) == [3, 4, 1, 0]  # already spanning: unchanged
    with pytest.raises(Exception, match="fewer geometries than the pool's 4 independent compositions"):
        cover_compositions(counts, [0, 1, 2, 3, 4], 3)


def test_a_head_with_few_energies_keeps_its_base_levels_reference_energies(
    tmp_path, tiny_model_file, two_fidelity_files
):
    """One hi energy (one composition) resolves one direction of the E0s; the others stay at lo's
    fitted E0s, not at the foundation's (which a real high level can be hundreds of eV away from)."""
    from mace_mf.workflows.run import train_run

    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=0)
    out = train_run(load_recipe(recipe_file, ["fidelities.hi.label_fraction=0.04"]), tmp_path / "run")
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith(("| lo |", "| hi |"))]
    lo, hi = (np.array([float(x) for x in row.strip("|").split("|")[1:]]) for row in table)
    train = ase.io.read(two_fidelity_files["train"], ":")
    kept = load_recipe(recipe_file, ["fidelities.hi.label_fraction=0.04"])
    foundation, info = load_foundation(kept.foundation.model, None, torch.float64)
    selected = select_data(kept, info, foundation).train
    (only,) = [selected.configs.atoms(int(selected.rows[p])) for p in np.flatnonzero(selected.energy_mask[:, 1])]
    composition = np.array([np.sum(only.numbers == z) for z in (1, 6, 7, 8)], dtype=float)
    delta = hi - lo
    np.testing.assert_allclose(delta, composition * (delta @ composition) / (composition @ composition), atol=1e-6)
    assert len(train) == 24


def test_only_configurations_with_a_weighed_label_are_trained_on(tmp_path, tiny_model_file, two_fidelity_files):
    """The high-level energies alone train as if given only the geometries that carry them: no batch of
    unweighed rows (an optimiser step on no data), whatever the rest of the file holds."""
    from mace_mf.workflows.run import train_run

    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    foundation, info = load_foundation(str(tiny_model_file), None, torch.float64)
    low_off = ["fidelities.lo.energy_weight=0", "fidelities.lo.forces_weight=0", "fidelities.hi.base=null"]
    subset = ["fidelities.hi.label_fraction=0.25", "fidelities.hi.coupling_strength=0"]
    energies_alone = load_recipe(recipe_file, [*subset, *low_off])
    train = select_data(energies_alone, info, foundation).train
    assert len(train) == 6 and train.energy_mask[:, 1].all()  # 25 % of 24
    assert len(select_data(load_recipe(recipe_file, subset), info, foundation).train) == 24  # lo weighs them all
    prior = ["fidelities.hi.base=lo", "fidelities.hi.coupling=independent", "fidelities.hi.base_forces_weight=1"]
    assert len(select_data(load_recipe(recipe_file, [*subset, *low_off[:2], *prior]), info, foundation).train) == 24
    out = train_run(energies_alone, tmp_path / "run")
    assert json.loads((out / "history.json").read_text())["epochs"][0]["steps"] == 2  # 6 geometries, batch 4
