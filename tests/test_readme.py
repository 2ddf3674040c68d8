"""The README's "Running your own" section, verbatim: its recipe, saved as it says, and every command
under it, run in that order on a fresh copy of the bundled data (training shortened by extra `--set`
options, the same on every train command, so that the resume is of the same recipe)."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from support import ROOT

from mace_mf.cli import main

SHORT = ["--set", "training.epochs=1", "--set", "data.max_train=24", "--set", "md_check.enabled=false"]


def section(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]


def test_running_your_own_works_as_written(tmp_path, monkeypatch, capsys):
    text = section("Running your own")
    recipe = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    commands = [
        shlex.split(line.split("  #")[0])[1:]
        for line in re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
        if line.startswith("mace-mf ")
    ]
    (tmp_path / "recipe.yaml").write_text(recipe)
    (tmp_path / "demo").symlink_to(ROOT / "demo")  # "in the repository's folder"
    monkeypatch.chdir(tmp_path)
    assert len(commands) == 7
    for args in commands:
        extra = SHORT if args[0] in ("train", "recipe") else []
        code = main([*args, *extra])
        out, err = capsys.readouterr()
        assert code == 0, (args, err[-2000:])
        if args[:2] == ["recipe", "check"]:
            assert "target: qzvp" in out
        if args[0] == "eval":
            assert "qzvp" in out
    assert json.loads((tmp_path / "runs/mf/run.json").read_text())["status"] == "complete"
    exported = sorted(p.name for p in (tmp_path / "exported").iterdir())
    assert "qzvp.model" in exported and "qzvp.compiled.model" in exported and "multihead.model" in exported
    assert (tmp_path / "lammps" / "qzvp.model-lammps.pt").is_file()
    model = torch.load(tmp_path / "exported" / "multihead.model", weights_only=False)
    assert model.heads[0] == "qzvp"  # the target first


def subsection(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.split(r"\n##+ ", text.split(f"### {name}\n", 1)[1], maxsplit=1)[0]


def test_deciding_without_high_level_forces_works_as_written(tmp_path, monkeypatch, capsys, tiny_model_file):
    """The user's real case: high-level forces nowhere in train or valid (only in test, to score).
    The README's three commands run as written, the level's calculator aside (CCSD(T) stands in for
    a Morse potential here, with the parameters of the data's high level), with the default arms."""
    import ase.io
    import yaml
    from support import label, sample_molecules

    for split, n, seed in (("train", 24, 1), ("valid", 8, 2), ("test", 8, 3)):
        frames = sample_molecules(n, seed)
        label(frames, "lo", 0.9, 1.25, -10.0)
        label(frames, "ccsdt", 1.0, 1.2, -50.0, forces=split == "test")
        ase.io.write(tmp_path / f"{split}.xyz", frames, format="extxyz")
    recipe = {
        "name": "own",
        "foundation": {"model": str(tiny_model_file)},
        "fidelities": {
            "lo": {"energy_key": "lo_energy", "forces_key": "lo_forces", "forces_weight": 10.0},
            "ccsdt": {
                "energy_key": "ccsdt_energy",
                "forces_key": "ccsdt_forces",
                "energy_weight": 10.0,
                "forces_weight": 0.0,
            },
        },
        "data": {"train": "train.xyz", "valid": "valid.xyz", "test": "test.xyz"},
        "training": {"epochs": 1, "batch_size": 4, "target": "ccsdt"},
        "export": {"torchscript": False},
        "md_check": {"enabled": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    text = subsection("Deciding without high-level forces: displacement pairs")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [shlex.split(line.split("  #")[0])[1:] for line in block.splitlines() if line.startswith("mace-mf ")]
    assert [c[0] for c in commands] == ["displace", "label", "bench"]
    stand_in = ["ase.calculators.morse:MorsePotential", "--calc-kwargs", '{"epsilon": 1.0, "r0": 1.2, "rho0": 6.0}']
    at = commands[1].index("--calculator") + 1
    commands[1][at : at + 1] = stand_in
    for args in commands:
        code = main(args)
        err = capsys.readouterr().err
        assert code == 0, (args, err[-2000:])
    results = (tmp_path / "runs/bench/results.md").read_text()
    assert "Left out: sf-high-ef trains on ccsdt forces (ccsdt_forces), which no training configuration carries" in (
        results
    )
    assert "left out: sf-high-ef" in err  # said on the console too
    result = json.loads((tmp_path / "runs/bench/results.json").read_text())
    decision, summary = result["decision"], result["summary"]
    assert decision["basis"] == "pairs" and decision["n_pairs"] == 40 and decision["n_energies"] == 80
    assert decision["geometries"] == 8 and 0.0 <= decision["preference"] <= 1.0
    values = decision["values"]
    assert set(values) == {"sf-high-e", "mf", "mf-transfer"} and decision["best"] == min(values, key=values.get)
    for arm, value in values.items():
        assert value == pytest.approx(summary[arm]["valid/fd_rmse_meV_A"], rel=1e-9)  # one seed: the same number
    assert "on 40 displacement pairs (80 ccsdt energies, 8 validation geometries)" in results
    assert result["verdict"].startswith("by 40 displacement pairs, multi-fidelity")
    assert "Recommended: " in results and (tmp_path / "runs/bench/recommended.yaml").is_file()
    for arm in ("zero-shot", "sf-high-e", "sf-low", "mf", "mf-transfer"):
        row = summary[arm]
        assert row["test/f_rmse_meV_A"] is not None  # the test split's forces score every arm
        assert row["valid/fd_rmse_lo_meV_A"] < row["valid/fd_rmse_meV_A"] < row["valid/fd_rmse_hi_meV_A"]
    assert "sf-high-ef" not in summary
    # asked for by name, the oracle is refused with the reason, before anything trains
    code = main([*commands[2], "--out", "runs/oracle", "--arms", "sf-high-e,sf-high-ef"])
    err = capsys.readouterr().err
    assert code == 2 and "--arms: sf-high-ef trains on ccsdt forces" in err
    assert not (tmp_path / "runs/oracle/sf-high-e").exists()
