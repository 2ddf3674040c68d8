"""Files for ASE, stock MACE and MD engines.

- ``<fidelity>.model``: a single-head ScaleShiftMACE (its one head named after the fidelity),
- ``multihead.model``: every fidelity as a head (``MACECalculator(..., head="dft")``), the target
  fidelity first (what a client without a head argument runs),
- ``<fidelity>.compiled.model``: TorchScript of the single-head model (OpenMM-style use, or any
  engine that calls a MACE forward),
- ``<fidelity>.model-lammps.pt`` (``lammps``): what mace-torch's ``mace_create_lammps_model`` makes
  of the single-head file: the float64 model wrapped in ``mace.calculators.LAMMPS_MACE`` and
  compiled, for LAMMPS' ``pair_style mace`` (its name is the one that tool gives it).

The pickles reference only mace-torch classes, so a process that never imports mace_mf loads them.
Every file carries :data:`METADATA_ATTRIBUTE`, a JSON string (a plain ``str`` attribute, which stock
loaders and TorchScript keep): the fidelities, target, elements, foundation and the versions of
mace_mf, mace-torch and torch that wrote it (:func:`read_metadata`).
"""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from mace.modules.models import ScaleShiftMACE

from mace_mf.errors import DataError, RunError
from mace_mf.files import atomic_torch_save, atomic_write_bytes, atomic_write_text
from mace_mf.model.foundation import load_model_file
from mace_mf.model.heads import EMBEDDING_PARAMETER, delta_bases, extract_head, head_names, merge_heads
from mace_mf.quiet import torchscript_quiet
from mace_mf.run_folder import HEADS_LIST, MULTIHEAD
from mace_mf.version import versions

log = logging.getLogger(__name__)

METADATA_ATTRIBUTE = "mace_mf_metadata"


def read_metadata(model: torch.nn.Module) -> dict[str, Any] | None:
    """What mace_mf recorded in an exported file (None for a file it did not write)."""
    text = getattr(model, METADATA_ATTRIBUTE, None)
    return json.loads(text) if isinstance(text, str) else None


def _portable(model: ScaleShiftMACE, metadata: dict[str, Any]) -> ScaleShiftMACE:
    portable = copy.deepcopy(model).cpu()
    portable.eval()
    for param in portable.parameters():
        param.requires_grad_(True)
    record = {**metadata, "heads": head_names(portable), **versions()}
    setattr(portable, METADATA_ATTRIBUTE, json.dumps(record))
    return portable


def _compiled_bytes(module: torch.nn.Module) -> bytes:
    """``module`` compiled by e3nn's TorchScript helper, as the bytes of a ``torch.jit.save`` file.

    e3nn compiles submodules in place, so a copy is compiled and ``module`` stays a plain module."""
    from e3nn.util import jit

    buffer = io.BytesIO()
    with torchscript_quiet():
        torch.jit.save(jit.compile(copy.deepcopy(module)), buffer)
    return buffer.getvalue()


def lammps_bytes(single: ScaleShiftMACE) -> bytes:
    """The LAMMPS file of a single-head model, made as ``mace_create_lammps_model`` makes it:
    converted to float64 on the CPU, wrapped in ``LAMMPS_MACE`` (its one head), compiled."""
    from mace.calculators import LAMMPS_MACE

    return _compiled_bytes(LAMMPS_MACE(copy.deepcopy(single).double().cpu()))


def export_models(
    model: ScaleShiftMACE,
    fidelities: list[str],
    folder: Path,
    multihead: bool,
    torchscript: bool,
    lammps: bool = False,
    metadata: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the requested files atomically, each carrying ``metadata``; return their paths."""
    written: list[Path] = []
    names = head_names(model)
    metadata = metadata or {}
    for name in fidelities:
        single = _portable(extract_head(model, name), metadata)
        path = folder / f"{name}.model"
        atomic_torch_save(single, path)
        written.append(path)
        if torchscript:
            compiled = folder / f"{name}.compiled.model"
            atomic_write_bytes(compiled, _compiled_bytes(single))
            written.append(compiled)
        if lammps:
            lammps_file = folder / f"{name}.model-lammps.pt"
            atomic_write_bytes(lammps_file, lammps_bytes(single))
            written.append(lammps_file)
    if multihead and getattr(model, EMBEDDING_PARAMETER, None) is not None:
        log.warning("fidelity-conditioned backbone: heads do not share a backbone, multihead.model not written")
        multihead = False
    order = names
    if multihead:
        path = folder / MULTIHEAD
        # The target first: a client that knows no heads (OpenMM-ML, a forward without `head`) runs
        # head 0, and should get the level the run was for, as mace-torch puts a fine-tuned head first.
        target = metadata.get("target")
        order = [target, *(n for n in names if n != target)] if target in names else names
        # Delta heads exist only in training; the file holds each head folded into a stock readout.
        plain = all(b is None for b in delta_bases(model)) and order == names
        stock = model if plain else merge_heads([extract_head(model, n) for n in order], order)
        atomic_torch_save(_portable(stock, metadata), path)
        written.append(path)
    atomic_write_text(folder / HEADS_LIST, "\n".join(order) + "\n")
    log.info("exported %s", ", ".join(p.name for p in written))
    return written


def export_file(
    model_or_run: Path, out: Path, fidelities: list[str] | None, torchscript: bool, lammps: bool
) -> list[Path]:
    """``mace-mf export``: the files of a multi-head model (or a run's) in a new folder ``out``;
    the metadata the model carries is kept, with this mace_mf's versions."""
    model, _ = load_model_file(model_or_run)
    names = head_names(model)
    for name in fidelities or []:
        if name not in names:
            raise DataError(f"--fidelity {name!r}: not a head of {model_or_run} (heads: {names})")
    if out.exists() and any(out.glob("*.model")):
        raise RunError(f"{out}: already holds exported models; choose another --out")
    metadata = read_metadata(model) or {}
    return export_models(model, list(fidelities or names), out, True, torchscript, lammps, metadata)
