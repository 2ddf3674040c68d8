"""Evaluating stock MACE model files (ours or anyone's) on labelled data.

A run folder stands for its ``models/multihead.model`` and its recipe's label keys; a bare model
file needs the keys, given as templates with ``{head}`` (``{head}_energy`` by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from mace.tools import AtomicNumberTable

from mace_mf.data import make_split, read_frames
from mace_mf.errors import DataError
from mace_mf.evaluate import compute_metrics, predict
from mace_mf.foundation import FoundationInfo, check_elements, load_foundation
from mace_mf.heads import head_names
from mace_mf.pairs import read_pairs, score_pairs
from mace_mf.recipe import FidelitySpec


def _model_path(model_or_run: Path) -> Path:
    if model_or_run.is_dir():
        path = model_or_run / "models" / "multihead.model"
        if not path.is_file():
            raise DataError(
                f"{model_or_run}: no models/multihead.model (not a finished mace_mf run, or one with "
                "export.multihead off or a fidelity-conditioned backbone); pass models/<fidelity>.model"
            )
        return path
    return model_or_run


def load_model_file(model_or_run: Path, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    model, _ = _load(model_or_run, dtype)
    return model


def _load(model_or_run: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, FoundationInfo]:
    return load_foundation(str(_model_path(model_or_run)), None, dtype, any_head=True)


def _specs_from_run(run: Path) -> dict[str, FidelitySpec] | None:
    resolved = run / "recipe.resolved.yaml"
    if not run.is_dir() or not resolved.is_file():
        return None
    tree = yaml.safe_load(resolved.read_text())
    return {name: FidelitySpec.model_validate(spec) for name, spec in tree["fidelities"].items()}


def evaluate_model_file(
    model_or_run: Path,
    data: list[str],
    heads: list[str] | None,
    energy_key: str,
    forces_key: str,
    batch_size: int,
    pairs: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics per head of a model file on the given data files (and displacement pairs)."""
    model, info = _load(model_or_run, torch.float64)
    names = head_names(model)
    chosen = heads or names
    for name in chosen:
        if name not in names:
            raise DataError(f"--head {name!r}: not a head of {model_or_run} (heads: {names})")
    run_specs = _specs_from_run(model_or_run)
    specs = {
        name: (run_specs or {}).get(name)
        or FidelitySpec(energy_key=energy_key.format(head=name), forces_key=forces_key.format(head=name))
        for name in chosen
    }
    frames = read_frames(data, specs, None)
    check_elements(info, {int(z) for f in frames for z in f.atoms.numbers}, ", ".join(data))
    z_table = AtomicNumberTable(list(info.atomic_numbers))
    split = make_split("data", frames, chosen, z_table, info.r_max, torch.float64)
    columns = [names.index(n) for n in chosen]
    metrics = compute_metrics(split, predict(model, split, columns, batch_size, torch.device("cpu")))
    if pairs:
        score_pairs(model, read_pairs(pairs, specs, None), columns, chosen, metrics, torch.device("cpu"), batch_size)
    return metrics
