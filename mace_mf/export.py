"""Files for ASE, stock MACE and MD engines.

- ``<fidelity>.model``: a single-head ScaleShiftMACE (its one head named after the fidelity),
- ``multihead.model``: every fidelity as a head (``MACECalculator(..., head="dft")``),
- ``<fidelity>.compiled.model``: TorchScript of the single-head model (OpenMM-style use, or any
  engine that calls a MACE forward),
- ``<fidelity>.model-lammps.pt`` (``lammps``): what mace-torch's ``mace_create_lammps_model`` makes
  of the single-head file: the float64 model wrapped in ``mace.calculators.LAMMPS_MACE`` and
  compiled, for LAMMPS' ``pair_style mace`` (its name is the one that tool gives it).

The pickles reference only mace-torch classes, so a process that never imports mace_mf loads them.
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path

import torch
from mace.modules.models import ScaleShiftMACE

from mace_mf.files import atomic_torch_save, atomic_write_bytes, atomic_write_text
from mace_mf.heads import EMBEDDING_PARAMETER, delta_bases, extract_head, head_names, merge_heads, torchscript_quiet

log = logging.getLogger(__name__)


def _portable(model: ScaleShiftMACE) -> ScaleShiftMACE:
    portable = copy.deepcopy(model).cpu()
    portable.eval()
    for param in portable.parameters():
        param.requires_grad_(True)
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
) -> list[Path]:
    """Write the requested files atomically; return their paths."""
    written: list[Path] = []
    names = head_names(model)
    for name in fidelities:
        single = _portable(extract_head(model, name))
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
    if multihead:
        path = folder / "multihead.model"
        # Delta heads exist only in training; the file holds each head folded into a stock readout.
        stock = (
            model
            if all(b is None for b in delta_bases(model))
            else merge_heads([extract_head(model, n) for n in names], names)
        )
        atomic_torch_save(_portable(stock), path)
        written.append(path)
    atomic_write_text(folder / "HEADS.txt", "\n".join(head_names(model)) + "\n")
    log.info("exported %s", ", ".join(p.name for p in written))
    return written
