"""Evaluating stock MACE model files (ours or anyone's) on labelled data (files or stores, streamed).

A run folder stands for its ``models/multihead.model`` and its recipe's label keys; a bare model
file needs the keys, given as templates with ``{head}`` (``{head}_energy`` by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from mace.tools import AtomicNumberTable

from mace_mf.config.schema import FidelitySpec
from mace_mf.data.graphs import GraphRecipe, Split
from mace_mf.data.pairs import read_pairs
from mace_mf.data.store import cache_root, open_configurations
from mace_mf.data.table import label_table
from mace_mf.errors import DataError
from mace_mf.evaluation.metrics import compute_metrics
from mace_mf.evaluation.pairs import score_pairs
from mace_mf.evaluation.predict import predict
from mace_mf.model.build import resolve_device
from mace_mf.model.foundation import check_elements, load_model_file
from mace_mf.model.heads import head_names
from mace_mf.run_folder import RunFolder


def _specs_from_run(run: Path) -> dict[str, FidelitySpec] | None:
    resolved = RunFolder(run).resolved_recipe
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
    device: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Metrics per head of a model file on the given data files (and displacement pairs), on ``device``
    (float64 on a CPU, float32 on a GPU)."""
    where = resolve_device(device)
    model, info = load_model_file(model_or_run, torch.float64 if where.type == "cpu" else torch.float32)
    model = model.to(where)
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
    configs = open_configurations(data, None, cache_root(None))
    check_elements(info, configs.elements, ", ".join(data))
    table = label_table(configs, specs)
    graphs = GraphRecipe(
        AtomicNumberTable(list(info.atomic_numbers)), info.r_max, chosen, next(model.parameters()).dtype,
        tuple(s.forces_key for s in specs.values()),
    )  # fmt: skip
    split = Split("data", table, graphs, keep=False)
    columns = [names.index(n) for n in chosen]
    metrics = compute_metrics(split, predict(model, split, columns, batch_size, where))
    if pairs:
        score_pairs(model, read_pairs(pairs, specs, None), columns, chosen, metrics, where, batch_size)
    return metrics
