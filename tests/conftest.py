"""Session fixtures: a tiny foundation file and small two-fidelity data files (see support.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support import build_tiny_mace, label, sample_molecules

# The test workloads are tiny: one thread avoids oversubscription (several times faster on 2 cores).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Stores converted from data files go to a cache of this test process, not the user's home.
os.environ["MACE_MF_CACHE"] = tempfile.mkdtemp(prefix="mace-mf-cache-")


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("foundation") / "tiny.model"
    torch.save(build_tiny_mace(), path)
    return path


@pytest.fixture(scope="session")
def two_fidelity_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/valid/test extxyz with `lo` energies+forces everywhere and `hi` energies (+ forces to score)."""
    import ase.io

    folder = tmp_path_factory.mktemp("data")
    paths = {}
    for split, n, seed in (("train", 24, 1), ("valid", 8, 2), ("test", 8, 3)):
        frames = sample_molecules(n, seed)
        label(frames, "lo", 0.9, 1.25, -10.0)
        label(frames, "hi", 1.0, 1.2, -50.0)
        paths[split] = folder / f"{split}.xyz"
        ase.io.write(paths[split], frames, format="extxyz")
    return paths


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B kept offline and inside ``tmp_path``: no key, no network, nothing in the home folder.

    Yields ``WANDB_DIR``; offline runs land in ``<WANDB_DIR>/wandb/offline-run-*``. wandb reads the
    environment once per process setup, so the setup is torn down before and after (as W&B's agent
    does between trials).
    """
    import wandb

    wandb.teardown()
    folders = {}
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        folders[var] = tmp_path / var.lower()
        folders[var].mkdir()
        monkeypatch.setenv(var, str(folders[var]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield folders["WANDB_DIR"]
    wandb.teardown()
