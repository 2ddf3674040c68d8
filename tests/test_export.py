"""Exported files beyond the stock pickles: LAMMPS' file as mace-torch makes it, and a quiet export."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from ase.build import molecule
from support import write_recipe

from mace_mf.cli import main
from mace_mf.config.loading import load_recipe
from mace_mf.quiet import TORCHSCRIPT_ANNOTATION_WARNING, torchscript_quiet
from mace_mf.workflows.run import train_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_file, two_fidelity_files):
    folder = tmp_path_factory.mktemp("export")
    recipe_file = write_recipe(folder / "recipe.yaml", tiny_model_file, two_fidelity_files, epochs=1)
    recipe = load_recipe(recipe_file, ["export.lammps=true", "md_check.enabled=false"])
    return train_run(recipe, folder / "out")


def lammps_inputs(model_file, atoms):
    """The tensors LAMMPS' ``pair_style mace`` hands the model (every atom local), built with
    mace-torch's own data pipeline from the buffers the LAMMPS file carries."""
    from mace import data as mace_data
    from mace.tools import AtomicNumberTable, torch_geometric

    loaded = torch.jit.load(str(model_file))
    z_table = AtomicNumberTable([int(z) for z in loaded.atomic_numbers])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the LAMMPS file is float64, as LAMMPS' positions are
    try:
        config = mace_data.config_from_atoms(atoms)
        graph = mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=float(loaded.r_max))
    finally:
        torch.set_default_dtype(previous)
    batch = next(iter(torch_geometric.dataloader.DataLoader([graph], batch_size=1)))
    inputs = {k: v for k, v in batch.to_dict().items() if isinstance(v, torch.Tensor)}
    inputs["positions"].requires_grad_(True)
    return loaded, inputs, torch.ones(len(atoms), dtype=torch.float64)


def test_lammps_file_is_what_mace_create_lammps_model_makes_and_reproduces_the_model(run, tmp_path):
    from mace.calculators import MACECalculator

    ours = run / "models" / "hi.model-lammps.pt"
    assert ours.is_file() and (run / "models" / "lo.model-lammps.pt").is_file()
    # mace-torch's own converter, on the exported single-head file
    single = tmp_path / "hi.model"
    shutil.copy(run / "models" / "hi.model", single)
    subprocess.run([sys.executable, "-m", "mace.cli.create_lammps_model", str(single)], check=True, capture_output=True)
    upstream = tmp_path / "hi.model-lammps.pt"

    atoms = molecule("CH3CHO")
    atoms.rattle(0.05, seed=3)
    stock = MACECalculator(model_paths=str(run / "models" / "hi.model"), device="cpu", default_dtype="float64")
    atoms.calc = stock
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    outputs = []
    for path in (ours, upstream):
        loaded, inputs, local = lammps_inputs(path, atoms)
        assert {"atomic_numbers", "r_max", "num_interactions", "head"} <= {n for n, _ in loaded.named_buffers()}
        out = loaded(inputs, local, False)
        outputs.append((float(out["total_energy_local"].sum()), out["forces"].detach().numpy()))
    for e, f in outputs:
        assert e == pytest.approx(energy, abs=1e-8)
        np.testing.assert_allclose(f, forces, atol=1e-8)
    ours_state = torch.jit.load(str(ours)).state_dict()
    theirs_state = torch.jit.load(str(upstream)).state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key, value in ours_state.items():
        assert torch.equal(value, theirs_state[key]), key


def test_export_command_writes_lammps_files_on_request(run, tmp_path):
    assert main(["export", str(run), "--out", str(tmp_path / "plain"), "--fidelity", "hi", "--no-torchscript"]) == 0
    assert not list((tmp_path / "plain").glob("*lammps*"))
    assert main(["export", str(run), "--out", str(tmp_path / "lmp"), "--fidelity", "hi", "--lammps"]) == 0
    assert (tmp_path / "lmp" / "hi.model-lammps.pt").is_file()
    assert not (tmp_path / "lmp" / "lo.model-lammps.pt").exists()


def test_export_silences_exactly_torchscripts_annotation_warning(run, tmp_path):
    from mace_mf.model.export import export_models
    from mace_mf.model.foundation import load_model_file

    model, _ = load_model_file(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_models(model, ["hi"], tmp_path / "models", multihead=True, torchscript=True, lammps=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not [m for m in messages if "TorchScript type system" in m], messages
    # the warning is real: building a readout outside the filter raises it
    from e3nn import o3
    from mace.modules.blocks import LinearReadoutBlock

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LinearReadoutBlock(o3.Irreps("8x0e"), o3.Irreps("2x0e"))
    assert any(str(w.message).startswith(TORCHSCRIPT_ANNOTATION_WARNING) for w in caught)
    # the filter names one message: any other warning raised inside it still reaches the user
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchscript_quiet():
            warnings.warn(TORCHSCRIPT_ANNOTATION_WARNING + " (a test)", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_a_training_run_prints_no_torchscript_annotation_warning(tmp_path, tiny_model_file):
    """What the user sees: a whole `mace-mf train` (elements cut, TorchScript and LAMMPS exports, MD
    check) in a fresh process writes no TorchScript annotation warning to the console."""
    import ase.io
    from support import ROOT, label, sample_molecules

    files = {}
    for split, n, seed in (("train", 16, 1), ("valid", 6, 2), ("test", 6, 3)):
        frames = [a for a in sample_molecules(2 * n, seed) if 7 not in a.numbers][:n]  # no N: the cut runs
        label(frames, "lo", 0.9, 1.25, -10.0)
        label(frames, "hi", 1.0, 1.2, -50.0)
        files[split] = tmp_path / f"{split}.xyz"
        ase.io.write(files[split], frames)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_file, files, epochs=1)
    command = [sys.executable, "-W", "always", "-m", "mace_mf.cli", "train", str(recipe), "--out", str(tmp_path / "o")]
    command += ["--set", "export.torchscript=true", "--set", "export.lammps=true"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kept H C O" in done.stderr  # the foundation was cut to the data's elements
    assert "TorchScript type system" not in done.stdout + done.stderr
