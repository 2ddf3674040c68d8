"""The README's "Running your own" section, verbatim: its recipe, saved as it says, and every command
under it, run in that order on a fresh copy of the bundled data (training shortened by extra `--set`
options, the same on every train command, so that the resume is of the same recipe)."""

from __future__ import annotations

import json
import re
import shlex

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
