"""The one builder of a recipe's model from a foundation's single head: runs, benchmarks and tests
all assemble the multi-fidelity model here, so a recipe option that changes the network (a coupling,
the fidelity embedding) cannot be left out by one of them."""

from __future__ import annotations

import torch
from mace.modules.models import ScaleShiftMACE

from mace_mf.config.schema import Recipe
from mace_mf.errors import RecipeError
from mace_mf.model.coupling import apply_couplings
from mace_mf.model.heads import add_fidelity_embedding, replicate_head

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a recipe's ``dtype`` (``float32`` or ``float64``)."""
    return DTYPES[name]


def build_model(single: ScaleShiftMACE, recipe: Recipe) -> ScaleShiftMACE:
    """One head per fidelity, each an exact copy of ``single``'s head, coupled as the recipe says
    (``delta`` heads become corrections of their bases) and, with ``training.fidelity_embedding``,
    a backbone conditioned on the fidelity. E0s are fitted afterwards, on data."""
    model = replicate_head(single, list(recipe.fidelities))
    apply_couplings(model, recipe)
    if recipe.training.fidelity_embedding:
        add_fidelity_embedding(model)
    return model


def resolve_device(name: str) -> torch.device:
    """The torch device a recipe or ``--device`` names, refused where it does not exist."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device: {name!r} requested but CUDA is not available; set device: cpu (--device cpu)")
    return device
