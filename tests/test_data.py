"""Reading labelled configurations: masks, splits, label subsets and one-line errors."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from support import label, sample_molecules

from mace_mf.config.schema import FidelitySpec
from mace_mf.data.read import check_declared_keys, read_frames
from mace_mf.data.splits import split_off, subsample_labels
from mace_mf.errors import DataError

SPECS = {
    "lo": FidelitySpec(energy_key="lo_energy", forces_key="lo_forces"),
    "hi": FidelitySpec(energy_key="hi_energy", forces_key="hi_forces", forces_weight=0.0),
}


def write(tmp_path, frames, name="data.xyz"):
    path = tmp_path / name
    ase.io.write(path, frames, format="extxyz")
    return str(path)


def test_partial_labels_are_masked_not_faked(tmp_path):
    frames = sample_molecules(6, seed=0)
    label(frames[:4], "lo", 1.0, 1.2, 0.0)
    label(frames[2:], "hi", 1.0, 1.2, 0.0, forces=False)
    read = read_frames(write(tmp_path, frames), SPECS, None)
    assert [f.labels.energy[0] is not None for f in read] == [True] * 4 + [False] * 2
    assert [f.labels.forces[0] is not None for f in read] == [True] * 4 + [False] * 2
    assert [f.labels.energy[1] is not None for f in read] == [False] * 2 + [True] * 4
    assert all(f.labels.forces[1] is None for f in read)
    np.testing.assert_allclose(read[0].labels.forces[0], frames[0].arrays["lo_forces"])


def test_calculator_results_are_read_for_energy_and_forces(tmp_path):
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = sample_molecules(2, seed=1)
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=-3.0, forces=np.full((len(atoms), 3), 0.5))
    read = read_frames(write(tmp_path, frames), {"pbe": FidelitySpec(energy_key="energy", forces_key="forces")}, None)
    assert read[1].labels.energy[0] == -3.0
    assert read[1].labels.forces[0].shape == (len(frames[1]), 3)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda a: a.info.__setitem__("lo_energy", float("nan")), "configuration 1: lo_energy (lo) is nan"),
        (lambda a: a.arrays["lo_forces"].__setitem__((0, 0), np.inf), "lo_forces (lo) contains NaN/inf"),
        (lambda a: a.info.__setitem__("lo_energy", "high"), "lo_energy (lo) is not a single number"),
    ],
)
def test_bad_labels_name_file_index_and_key(tmp_path, corrupt, message):
    frames = sample_molecules(3, seed=2)
    label(frames, "lo", 1.0, 1.2, 0.0)
    corrupt(frames[1])
    path = write(tmp_path, frames)
    with pytest.raises(DataError) as info:
        read_frames(path, SPECS, None)
    assert str(info.value).startswith(f"{path}: configuration 1")
    assert message in str(info.value)


def test_wrongly_shaped_forces(tmp_path):
    frames = sample_molecules(2, seed=3)
    label(frames, "lo", 1.0, 1.2, 0.0)
    frames[1].new_array("lo_forces_bad", np.zeros((len(frames[1]), 2)))
    frames[0].new_array("lo_forces_bad", np.zeros((len(frames[0]), 3)))
    specs = {"lo": FidelitySpec(energy_key="lo_energy", forces_key="lo_forces_bad")}
    with pytest.raises(DataError, match=r"configuration 1: lo_forces_bad \(lo\) has shape \(\d+, 2\), expected"):
        read_frames(write(tmp_path, frames), specs, None)


def test_broken_geometries_and_files(tmp_path):
    frames = sample_molecules(2, seed=4)
    frames[1].positions[1] = frames[1].positions[0] + [0.05, 0.0, 0.0]
    with pytest.raises(DataError, match=r"configuration 1: atoms 0\.050 Å apart"):
        read_frames(write(tmp_path, frames), SPECS, None)
    with pytest.raises(DataError, match="data file not found"):
        read_frames(str(tmp_path / "missing.xyz"), SPECS, None)
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.xyz"):
        read_frames(str(empty), SPECS, None)


def test_declared_key_that_no_configuration_has(tmp_path):
    frames = sample_molecules(3, seed=5)
    label(frames, "lo", 1.0, 1.2, 0.0)
    read = read_frames(write(tmp_path, frames), SPECS, None)
    with pytest.raises(DataError, match=r"fidelities\.hi\.energy_key 'hi_energy' is in no configuration"):
        check_declared_keys(read, SPECS, "data.train")


def test_label_fraction_keeps_a_seeded_subset_of_one_fidelity(tmp_path):
    frames = sample_molecules(40, seed=6)
    label(frames, "lo", 1.0, 1.2, 0.0)
    label(frames, "hi", 1.0, 1.2, 0.0)
    specs = dict(SPECS, hi=FidelitySpec(energy_key="hi_energy", forces_key="hi_forces", label_fraction=0.25))
    path = write(tmp_path, frames)
    kept = []
    for _ in range(2):
        read = read_frames(path, specs, None)
        subsample_labels(read, specs, seed=3)
        kept.append([f.labels.energy[1] is not None for f in read])
        assert all(f.labels.energy[0] is not None for f in read)
    assert sum(kept[0]) == 10 and kept[0] == kept[1]


def test_split_off_is_seeded_and_disjoint():
    items = list(range(50))
    kept, held = split_off(items, 10, seed=1, salt=1)
    assert len(held) == 10 and sorted(kept + held) == items
    assert split_off(items, 10, seed=1, salt=1) == (kept, held)
    assert split_off(items, 10, seed=2, salt=1)[1] != held


def test_forces_only_scored_may_live_in_validation_and_test_alone(tmp_path):
    """The seed paper's layout: high-level forces computed for scoring only, on valid/test."""
    train = sample_molecules(3, seed=5)
    label(train, "lo", 1.0, 1.2, 0.0)
    label(train, "hi", 1.0, 1.3, 0.0, forces=False)
    scored = sample_molecules(2, seed=6)
    label(scored, "hi", 1.0, 1.3, 0.0)
    read_train = read_frames(write(tmp_path, train), SPECS, None)
    read_scored = read_frames(write(tmp_path, scored, "scored.xyz"), SPECS, None)
    assert SPECS["hi"].forces_weight == 0
    check_declared_keys(read_train, SPECS, "data.train", read_scored)
    with pytest.raises(DataError, match=r"fidelities\.hi\.forces_key 'hi_forces' is in no configuration"):
        check_declared_keys(read_train, SPECS, "data.train")
    trained = {**SPECS, "hi": SPECS["hi"].model_copy(update={"forces_weight": 10.0})}
    with pytest.raises(DataError, match="trains on them"):
        check_declared_keys(read_train, trained, "data.train", read_scored)
