"""Files for ASE, stock MACE and MD engines.

- ``<fidelity>.model``: a single-head ScaleShiftMACE (its one head named after the fidelity),
- ``multihead.model``: every fidelity as a head (``MACECalculator(..., head="dft")``),
- ``<fidelity>.compiled.model``: TorchScript of the single-head model for LAMMPS/OpenMM-style use.

The pickles reference only mace-torch classes, so a process that never imports mace_mf loads them.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path

import torch
from mace.modules.models import ScaleShiftMACE

from mace_mf.files import atomic_torch_save, atomic_write_bytes, atomic_write_text
from mace_mf.heads import EMBEDDING_PARAMETER, delta_bases, extract_head, head_names, merge_heads

log = logging.getLogger(__name__)


def _portable(model: ScaleShiftMACE) -> ScaleShiftMACE:
    portable = copy.deepcopy(model).cpu()
    portable.eval()
    for param in portable.parameters():
        param.requires_grad_(True)
    return portable


def export_models(
    model: ScaleShiftMACE, fidelities: list[str], folder: Path, multihead: bool, torchscript: bool
) -> list[Path]:
    """Write the requested files atomically; return their paths."""
    from e3nn.util import jit

    written: list[Path] = []
    names = head_names(model)
    for name in fidelities:
        single = _portable(extract_head(model, name))
        path = folder / f"{name}.model"
        atomic_torch_save(single, path)
        written.append(path)
        if torchscript:
            buffer = io.BytesIO()
            with warnings.catch_warnings():  # e3nn's scripting warns about annotations it handles
                warnings.simplefilter("ignore", UserWarning)
                torch.jit.save(jit.compile(single), buffer)
            compiled = folder / f"{name}.compiled.model"
            atomic_write_bytes(compiled, buffer.getvalue())
            written.append(compiled)
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
