"""The data store: converted once (in parallel, resumably), read by index, cached by content, and a
run that streams its graphs from it equals one that keeps them in memory."""

from __future__ import annotations

import json
import os
import shutil

import ase.io
import h5py
import numpy as np
import pytest
import yaml
from ase.calculators.singlepoint import SinglePointCalculator
from support import label, sample_molecules, write_recipe

from mace_mf.cli import main
from mace_mf.config.loading import load_recipe
from mace_mf.data.store import Store, open_configurations, open_data, preprocess
from mace_mf.errors import DataError
from mace_mf.workflows.run import train_run


def labelled_file(tmp_path, n=24, seed=1, name="data.xyz"):
    frames = sample_molecules(n, seed)
    label(frames, "lo", 0.9, 1.25, -10.0)
    label(frames, "hi", 1.0, 1.2, -50.0, forces=False)
    for i, atoms in enumerate(frames):
        atoms.info.update(config_id=i, molecule=atoms.get_chemical_formula(), charge=0)
    path = tmp_path / name
    ase.io.write(path, frames, format="extxyz")
    return path


def same_atoms(a, b):
    assert (a.numbers == b.numbers).all() and np.array_equal(a.positions, b.positions)
    assert np.array_equal(a.cell.array, b.cell.array) and (a.pbc == b.pbc).all()
    assert a.info == b.info, (a.info, b.info)
    for key in b.arrays:
        if key not in ("numbers", "positions"):
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])


def test_a_store_holds_exactly_what_ase_reads_whatever_the_worker_count(tmp_path):
    path = labelled_file(tmp_path)
    one = preprocess([path], tmp_path / "one", workers=1, chunk=5)
    two = preprocess([path], tmp_path / "two", workers=2, chunk=5)
    frames = ase.io.read(path, ":")
    assert len(one) == len(two) == 24 and len(one.manifest["shards"]) == 5
    for i, atoms in enumerate(frames):
        same_atoms(one.atoms(i), atoms)
        same_atoms(two.atoms(i), atoms)
    assert one.where(13) == f"{path.resolve()}: configuration 13"
    assert one.manifest["info"]["molecule"]["kind"] == "str" and one.manifest["info"]["config_id"]["kind"] == "int"
    assert one.manifest["elements"] == [1, 6, 7, 8]
    strip = ("seconds",)
    assert {k: v for k, v in one.manifest.items() if k not in strip} == {
        k: v for k, v in two.manifest.items() if k not in strip
    }


def test_an_interrupted_preprocess_is_never_read_and_resumes(tmp_path):
    path = labelled_file(tmp_path)
    out = tmp_path / "store"
    preprocess([path], out, chunk=5)
    # What a kill leaves: no manifest, a shard being written, shards not started.
    (out / "manifest.json").unlink()
    for k in (3, 4):
        (out / f"shard-0000{k}.h5").unlink()
        (out / f"shard-0000{k}.json").unlink()
    (out / "shard-00003.h5.tmp").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="the store was not finished"):
        Store(out)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[012].h5")}
    store = preprocess([path], out, chunk=5)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[012].h5")} == kept  # not converted again
    assert len(store) == 24 and not list(out.glob("*.tmp"))
    for i, atoms in enumerate(ase.io.read(path, ":")):
        same_atoms(store.atoms(i), atoms)
    other = labelled_file(tmp_path, seed=2, name="other.xyz")
    (out / "manifest.json").unlink()
    with pytest.raises(Exception, match="an unfinished store of other files"):
        preprocess([other], out, chunk=5)


def test_skip_bad_leaves_out_and_lists_broken_configurations(tmp_path):
    frames = ase.io.read(labelled_file(tmp_path), ":")
    frames[3].positions[1] = frames[3].positions[0] + [0.05, 0.0, 0.0]
    frames[7].info["lo_energy"] = float("inf")
    path = tmp_path / "bad.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"bad\.xyz: configuration 3: atoms 0\.050 Å apart"):
        preprocess([path], tmp_path / "strict")
    store = preprocess([path], tmp_path / "lenient", skip_bad=True, chunk=5)
    assert len(store) == 22 and store.manifest["skipped"] == 2
    listed = (tmp_path / "lenient" / "skipped.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[1] for line in listed] == ["3", "7"]
    assert store.where(3) == f"{path.resolve()}: configuration 4"  # rows keep naming their source index


def test_a_changed_source_is_refused_and_a_vanished_one_is_not(tmp_path):
    path = labelled_file(tmp_path)
    preprocess([path], tmp_path / "store")
    os.utime(path, ns=(1, 1))  # touched, same content: fine
    open_data(tmp_path / "store", None, tmp_path / "cache")
    labelled_file(tmp_path, seed=9)
    with pytest.raises(DataError, match="which has changed since; rebuild"):
        open_data(tmp_path / "store", None, tmp_path / "cache")
    path.unlink()
    assert len(open_data(tmp_path / "store", None, tmp_path / "cache")) == 24


def test_data_files_are_converted_once_and_found_again_by_content(tmp_path):
    path = labelled_file(tmp_path)
    cache = tmp_path / "cache"
    first = open_data(path, None, cache)
    stamp = (first.path / "manifest.json").stat().st_mtime_ns
    copy = tmp_path / "elsewhere.xyz"
    shutil.copy(path, copy)
    again = open_data(copy, None, cache)  # another path, the same bytes
    assert again.path == first.path and (again.path / "manifest.json").stat().st_mtime_ns == stamp
    assert len(list(cache.glob("*-extxyz-*"))) == 1


def test_a_store_from_another_layout_is_refused_and_a_cached_one_rebuilt(tmp_path):
    path = labelled_file(tmp_path)
    cache = tmp_path / "cache"
    cached = open_data(path, None, cache)
    shard = next(cached.path.glob("shard-*.h5"))
    with h5py.File(shard, "a") as handle:
        del handle["atom_start"]  # what a shard from a development build of the same format looked like
    with pytest.raises(DataError, match=r"shard lacks atom_start .* rebuild the store"):
        Store(cached.path).shard(0)
    rebuilt = open_data(path, None, cache)
    assert rebuilt.path == cached.path and rebuilt.shard(0).has("atom_start")
    same_atoms(rebuilt.atoms(0), ase.io.read(path, 0))


def test_mace_torch_hdf5_and_lmdb_data_are_read(tmp_path):
    import h5py
    from mace.data.utils import Configuration, save_configurations_as_HDF5
    from mace.tools.fairchem_dataset.lmdb_dataset_tools import LMDBDatabase

    frames = ase.io.read(labelled_file(tmp_path, n=6), ":")
    configs = [
        Configuration(
            atomic_numbers=a.numbers,
            positions=a.positions,
            properties={"energy": a.info["lo_energy"], "forces": a.arrays["lo_forces"]},
            property_weights={"energy": 1.0, "forces": 1.0},
            cell=a.cell.array,
            pbc=tuple(a.pbc),
        )
        for a in frames
    ]
    with h5py.File(tmp_path / "train.h5", "w") as handle:
        save_configurations_as_HDF5(configs, 0, handle)
    lmdb = tmp_path / "train.aselmdb"
    with LMDBDatabase(lmdb, readonly=False) as db:
        for a in frames:
            atoms = a.copy()
            atoms.calc = SinglePointCalculator(atoms, energy=a.info["lo_energy"], forces=a.arrays["lo_forces"])
            db.write(atoms)
    for source in (tmp_path / "train.h5", lmdb):
        configs = open_configurations(str(source), None, tmp_path / "cache")
        assert len(configs) == 6
        for i, atoms in enumerate(frames):
            record = configs.record(i, ["energy"], ["forces"])
            assert record.info["energy"] == atoms.info["lo_energy"]
            np.testing.assert_array_equal(record.arrays["forces"], atoms.arrays["lo_forces"])
            np.testing.assert_array_equal(record.positions, atoms.positions)


def test_preprocess_command(tmp_path, capsys):
    path = labelled_file(tmp_path)
    assert main(["preprocess", str(path), "--out", str(tmp_path / "store"), "--workers", "2", "--chunk", "10"]) == 0
    err = capsys.readouterr().err
    assert "24 configurations" in err and "configurations/s with 2 worker(s)" in err
    assert main(["preprocess", str(path), "--out", str(tmp_path / "store")]) == 2
    assert "already holds a store" in capsys.readouterr().err


def test_graphs_streamed_by_workers_train_exactly_like_kept_graphs(tmp_path, tiny_model_file, two_fidelity_files):
    """A seeded run that builds its graphs in two DataLoader worker processes, from a store made by
    ``mace-mf preprocess``, ends with the metrics and E0s of the run that keeps its graphs in memory."""
    store = tmp_path / "train-store"
    preprocess([two_fidelity_files["train"]], store, workers=2, chunk=7)
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=2)
    tree = yaml.safe_load(recipe_file.read_text())
    tree["md_check"] = {"enabled": False}
    recipe_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    kept = train_run(load_recipe(recipe_file, ["data.keep_graphs=true"]), tmp_path / "kept")
    streamed = train_run(
        load_recipe(recipe_file, [f"data.train={store}", "data.keep_graphs=false", "training.num_workers=2"]),
        tmp_path / "streamed",
    )
    a = json.loads((kept / "metrics.json").read_text())
    b = json.loads((streamed / "metrics.json").read_text())
    for split in a:
        for fidelity in a[split]:
            for key, value in a[split][fidelity].items():
                assert b[split][fidelity][key] == pytest.approx(value, rel=1e-9, abs=1e-9), (split, fidelity, key)
    e0s = [line for line in (kept / "report.md").read_text().splitlines() if line.startswith(("| lo |", "| hi |"))]
    assert e0s == [line for line in (streamed / "report.md").read_text().splitlines() if line in e0s]
    log = (streamed / "train.log").read_text()
    assert "graphs built from the store as batches need them" in log


def test_steps_per_epoch_caps_an_epoch(tmp_path, tiny_model_file, two_fidelity_files):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=2)
    out = train_run(load_recipe(recipe_file, ["training.steps_per_epoch=2", "md_check.enabled=false"]), tmp_path / "r")
    history = json.loads((out / "history.json").read_text())
    assert [r["steps"] for r in history["epochs"]] == [2, 2]  # 24 configurations in batches of 4: 6 without the cap
