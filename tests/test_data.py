"""Reading labelled configurations through stores: masks, splits, label subsets and one-line errors."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from support import ROOT, label, sample_molecules

from mace_mf.config.loading import recipe_from_dict
from mace_mf.config.schema import FidelitySpec
from mace_mf.data.splits import split_off, subsample_labels
from mace_mf.data.store import cache_root, open_configurations
from mace_mf.data.table import check_declared_keys, label_table
from mace_mf.errors import DataError

SPECS = {
    "lo": FidelitySpec(energy_key="lo_energy", forces_key="lo_forces"),
    "hi": FidelitySpec(energy_key="hi_energy", forces_key="hi_forces", forces_weight=0.0),
}


def write(tmp_path, frames, name="data.xyz"):
    path = tmp_path / name
    ase.io.write(path, frames, format="extxyz")
    return str(path)


def table_of(path, specs=SPECS):
    return label_table(open_configurations(path, None, cache_root(None)), specs)


def test_partial_labels_are_masked_not_faked(tmp_path):
    frames = sample_molecules(6, seed=0)
    label(frames[:4], "lo", 1.0, 1.2, 0.0)
    label(frames[2:], "hi", 1.0, 1.2, 0.0, forces=False)
    path = write(tmp_path, frames)
    table = table_of(path)
    assert table.energy_mask[:, 0].tolist() == [True] * 4 + [False] * 2
    assert table.forces_mask[:, 0].tolist() == [True] * 4 + [False] * 2
    assert table.energy_mask[:, 1].tolist() == [False] * 2 + [True] * 4
    assert not table.forces_mask[:, 1].any()
    first = ase.io.read(path, 0)  # the store holds exactly what ASE reads from the file
    assert np.isnan(table.energies[4, 0]) and table.energies[0, 0] == first.info["lo_energy"]
    record = table.configs.record(0, (), ["lo_forces"])
    np.testing.assert_array_equal(record.arrays["lo_forces"], first.arrays["lo_forces"])
    np.testing.assert_array_equal(record.positions, first.positions)


def test_calculator_results_are_read_for_energy_and_forces(tmp_path):
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = sample_molecules(2, seed=1)
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=-3.0, forces=np.full((len(atoms), 3), 0.5))
    table = table_of(write(tmp_path, frames), {"pbe": FidelitySpec(energy_key="energy", forces_key="forces")})
    assert table.energies[1, 0] == -3.0 and table.forces_mask.all()
    assert table.configs.record(1, (), ["forces"]).arrays["forces"].shape == (len(frames[1]), 3)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda a: a.info.__setitem__("lo_energy", float("nan")), "configuration 1: lo_energy is nan"),
        (lambda a: a.arrays["lo_forces"].__setitem__((0, 0), np.inf), "lo_forces contains NaN/inf"),
        (lambda a: a.info.__setitem__("lo_energy", "high"), "lo_energy (lo) is not a single number"),
    ],
)
def test_bad_labels_name_file_index_and_key(tmp_path, corrupt, message):
    frames = sample_molecules(3, seed=2)
    label(frames, "lo", 1.0, 1.2, 0.0)
    corrupt(frames[1])
    path = write(tmp_path, frames)
    with pytest.raises(DataError) as info:
        table_of(path)
    assert str(info.value).startswith(f"{path}: configuration 1")
    assert message in str(info.value)


def test_wrongly_shaped_forces(tmp_path):
    frames = sample_molecules(2, seed=3)
    label(frames, "lo", 1.0, 1.2, 0.0)
    frames[1].new_array("lo_forces_bad", np.zeros((len(frames[1]), 2)))
    frames[0].new_array("lo_forces_bad", np.zeros((len(frames[0]), 3)))
    specs = {"lo": FidelitySpec(energy_key="lo_energy", forces_key="lo_forces_bad")}
    with pytest.raises(DataError, match=r"configuration 1: lo_forces_bad has shape \(\d+, 2\), but rows of shape"):
        table_of(write(tmp_path, frames), specs)
    for atoms in frames:  # the same wrong shape everywhere: the store takes it, the recipe does not
        atoms.arrays["lo_forces_bad"] = np.zeros((len(atoms), 2))
    with pytest.raises(DataError, match=r"configuration 0: lo_forces_bad \(lo\) has rows of shape \(2,\), expected"):
        table_of(write(tmp_path, frames, "same.xyz"), specs)


def test_broken_geometries_and_files(tmp_path):
    frames = sample_molecules(2, seed=4)
    frames[1].positions[1] = frames[1].positions[0] + [0.05, 0.0, 0.0]
    with pytest.raises(DataError, match=r"configuration 1: atoms 0\.050 Å apart"):
        table_of(write(tmp_path, frames))
    with pytest.raises(DataError, match="data file not found"):
        table_of(str(tmp_path / "missing.xyz"))
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.xyz"):
        table_of(str(empty))


def test_declared_key_that_no_configuration_has(tmp_path):
    frames = sample_molecules(3, seed=5)
    label(frames, "lo", 1.0, 1.2, 0.0)
    table = table_of(write(tmp_path, frames))
    with pytest.raises(DataError, match=r"fidelities\.hi\.energy_key 'hi_energy' is in no configuration"):
        check_declared_keys(table, SPECS, "data.train")


def test_label_fraction_keeps_a_seeded_subset_of_one_fidelity(tmp_path):
    frames = sample_molecules(40, seed=6)
    label(frames, "lo", 1.0, 1.2, 0.0)
    label(frames, "hi", 1.0, 1.2, 0.0)
    path = write(tmp_path, frames)
    tree = {
        "seed": 3,
        "foundation": {"model": "unused.model"},
        "fidelities": {
            "lo": {"energy_key": "lo_energy", "forces_key": "lo_forces"},
            "hi": {"energy_key": "hi_energy", "forces_key": "hi_forces", "label_fraction": 0.25},
        },
        "data": {"train": path},
    }
    recipe = recipe_from_dict(tree, "test", ROOT)
    kept = []
    for _ in range(2):
        table = table_of(path, recipe.fidelities)
        subsample_labels(table, recipe)
        kept.append(table.energy_mask[:, 1].tolist())
        assert table.energy_mask[:, 0].all()
        assert (table.forces_mask[:, 1] == table.energy_mask[:, 1]).all()  # forces go with the energies
    assert sum(kept[0]) == 10 and kept[0] == kept[1]


def test_split_off_is_seeded_and_disjoint():
    kept, held = split_off(50, 10, seed=1, salt=1)
    assert len(held) == 10 and sorted([*kept, *held]) == list(range(50))
    assert [a.tolist() for a in split_off(50, 10, seed=1, salt=1)] == [kept.tolist(), held.tolist()]
    assert split_off(50, 10, seed=2, salt=1)[1].tolist() != held.tolist()


def test_forces_only_scored_may_live_in_validation_and_test_alone(tmp_path):
    """The seed paper's layout: high-level forces computed for scoring only, on valid/test."""
    train = sample_molecules(3, seed=5)
    label(train, "lo", 1.0, 1.2, 0.0)
    label(train, "hi", 1.0, 1.3, 0.0, forces=False)
    scored = sample_molecules(2, seed=6)
    label(scored, "hi", 1.0, 1.3, 0.0)
    read_train = table_of(write(tmp_path, train))
    read_scored = table_of(write(tmp_path, scored, "scored.xyz"))
    assert SPECS["hi"].forces_weight == 0
    check_declared_keys(read_train, SPECS, "data.train", [read_scored])
    with pytest.raises(DataError, match=r"fidelities\.hi\.forces_key 'hi_forces' is in no configuration"):
        check_declared_keys(read_train, SPECS, "data.train")
    trained = {**SPECS, "hi": SPECS["hi"].model_copy(update={"forces_weight": 10.0})}
    with pytest.raises(DataError, match=r"only in the validation/test data.*set fidelities\.hi\.forces_weight: 0"):
        check_declared_keys(read_train, trained, "data.train", [read_scored])
    with pytest.raises(DataError, match="trains on them"):  # nowhere at all
        check_declared_keys(read_train, trained, "data.train")
