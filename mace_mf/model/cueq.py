"""cuEquivariance kernels for training (``training.cueq``), and back to stock e3nn for every file.

mace-torch converts a model to its cuEquivariance form (``mace.cli.convert_e3nn_cueq``: the same
classes built with a ``cueq_config``, weights remapped to the ``ir_mul`` layout) and back
(``convert_cueq_e3nn``). The converted model keeps the call signatures that mace_mf's
shared-backbone forward uses, and its readout weights keep their e3nn order, so training, the
coupling penalties and the metrics run on it unchanged; what mace-torch's conversion does not know
of a mace_mf model (which heads are ``delta`` corrections, the fidelity embedding) is carried over
here. Exports and MD checks always use the e3nn model, so stock loaders without cuequivariance read
every file. On a CPU cuequivariance runs its reference (naive) implementation: slower than e3nn, but
the same numbers, which is how the round trip is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from mace.modules.models import ScaleShiftMACE

from mace_mf.errors import RecipeError
from mace_mf.model.heads import DELTA_ATTRIBUTE, EMBEDDING_PARAMETER
from mace_mf.quiet import torchscript_quiet

INSTALL = (
    "pip install 'mace-mf[cueq]' (cuequivariance-torch; add cuequivariance-ops-torch-cu12 or -cu13 for the GPU "
    "kernels), or set training.cueq: false"
)


def cueq_available() -> bool:
    try:
        import cuequivariance_torch  # noqa: F401
    except ImportError:
        return False
    return True


def _converted(model: ScaleShiftMACE, convert: Callable[..., Any]) -> ScaleShiftMACE:
    device = next(model.parameters()).device
    previous = torch.get_default_dtype()
    try:
        with torchscript_quiet():
            result = convert(model, device=device.type, return_model=True)
    finally:
        torch.set_default_dtype(previous)  # mace's converters set the model's dtype as the default
    result = result.to(device)
    bases = getattr(model, DELTA_ATTRIBUTE, None)
    if bases is not None:
        setattr(result, DELTA_ATTRIBUTE, list(bases))
    embedding = getattr(model, EMBEDDING_PARAMETER, None)
    if embedding is not None:
        result.register_parameter(EMBEDDING_PARAMETER, torch.nn.Parameter(embedding.detach().clone()))
    return result


def to_cueq(model: ScaleShiftMACE) -> ScaleShiftMACE:
    """The same model with cuEquivariance kernels (a new module; ``model`` is left as it is)."""
    if not cueq_available():
        raise RecipeError(f"training.cueq: cuequivariance is not installed; {INSTALL}")
    from mace.cli.convert_e3nn_cueq import run

    return _converted(model, run)


def is_cueq(model: torch.nn.Module) -> bool:
    config = getattr(model.interactions[0], "cueq_config", None) if hasattr(model, "interactions") else None
    return bool(getattr(config, "enabled", False))


def to_e3nn(model: ScaleShiftMACE) -> ScaleShiftMACE:
    """``model`` with stock e3nn layers (itself when it has no cuEquivariance layers)."""
    if not is_cueq(model):
        return model
    from mace.cli.convert_cueq_e3nn import run

    return _converted(model, run)
