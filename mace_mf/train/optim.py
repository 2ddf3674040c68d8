"""What the optimiser sees: parameter groups by block with their learning-rate factors, the
heads-only warm-up, and the optimiser, plateau scheduler and weight average built from the recipe."""

from __future__ import annotations

from typing import Any

import torch
from torch_ema import ExponentialMovingAverage

from mace_mf.config.schema import TrainingSpec
from mace_mf.errors import RunError

BLOCKS = {
    "embedding": ("node_embedding", "radial_embedding"),
    "interactions": ("interactions",),
    "products": ("products",),
    "readouts": ("readouts",),
}


def block_of(name: str) -> str:
    top = name.split(".", 1)[0]
    for block, modules in BLOCKS.items():
        if top in modules:
            return block
    return "other"


def parameter_groups(model: torch.nn.Module, lr: float, factors: dict[str, float]) -> list[dict[str, Any]]:
    """One optimizer group per block, with the block's learning-rate factor (0 = frozen)."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        groups.setdefault(block_of(name), []).append(param)
    result = []
    for block, params in groups.items():
        factor = factors.get(block, 1.0)
        if factor == 0.0:
            for p in params:
                p.requires_grad_(False)
            continue
        result.append({"params": params, "lr": lr * factor, "name": block})
    return result


def set_backbone_frozen(model: torch.nn.Module, frozen: bool, factors: dict[str, float]) -> None:
    """Heads-only warm-up: only readouts learn while ``frozen``."""
    for name, param in model.named_parameters():
        block = block_of(name)
        param.requires_grad_(factors.get(block, 1.0) != 0.0 and (block == "readouts" or not frozen))


def make_optimiser(
    model: torch.nn.Module, t: TrainingSpec
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau, ExponentialMovingAverage | None]:
    """The optimiser over the trainable blocks, its plateau scheduler and the EMA of the weights."""
    groups = parameter_groups(model, t.lr, t.lr_factors)
    if not groups:
        raise RunError("training.lr_factors: every block is frozen (factor 0); nothing to train")
    optimizer_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(groups, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=t.scheduler_factor, patience=t.scheduler_patience
    )
    ema = (
        ExponentialMovingAverage([p for g in groups for p in g["params"]], decay=t.ema_decay)
        if t.ema_decay is not None
        else None
    )
    return optimizer, scheduler, ema
