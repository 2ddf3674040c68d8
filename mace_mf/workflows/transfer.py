"""The two stages of ``transfer.enabled``: the recipe's multi-fidelity fine-tuning, then the target
fidelity's labels alone, starting from the target model the first stage exported.

Both stages are ordinary single-stage recipes, so each is trained, resumed, reported and exported as
any run is (:func:`mace_mf.workflows.run.train_run` runs them in turn), and ``mace-mf bench``'s
``mf-transfer`` arm trains :func:`second_stage` from its ``mf`` arm's model: what it measures is what
the recipe key trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mace_mf.config.loading import recipe_from_dict, set_dotted
from mace_mf.config.schema import Recipe

FIRST_STAGE = "multi-fidelity"  # the first stage's run folder, inside the run's own


def _with(recipe: Recipe, values: dict[str, Any], source: str) -> Recipe:
    """``recipe`` with dotted keys set, validated again (so derived defaults are resolved anew)."""
    tree = recipe.model_dump(mode="json")
    for key, value in values.items():
        set_dotted(tree, key, value)
    return recipe_from_dict(tree, source, Path.cwd())  # paths are absolute already


def first_stage(recipe: Recipe) -> Recipe:
    """The recipe as written, as one stage: every fidelity's file exported (the target's is where the
    second stage starts), the MD check left to the second stage, whose model is the run's product."""
    exported = recipe.export.fidelities
    values: dict[str, Any] = {
        "name": f"{recipe.name}-{FIRST_STAGE}",
        "transfer.enabled": False,
        "md_check.enabled": False,
        "wandb.group": recipe.wandb.group or recipe.name,  # the two stages side by side in W&B
    }
    if exported is not None:
        values["export.fidelities"] = list(dict.fromkeys([*exported, recipe.target]))
    return _with(recipe, values, f"{recipe.name}: transfer, first stage")


def second_stage(recipe: Recipe, start: Path) -> Recipe:
    """The target fidelity's labels alone, from ``start`` (the first stage's target model): the other
    fidelities' weights 0 and the target's coupling to them cut, its own weights and label subset
    (``label_fraction``) as the recipe gives them; ``transfer.epochs`` epochs; only the target's file
    exported."""
    high = recipe.target
    values: dict[str, Any] = {
        "transfer.enabled": False,
        "foundation.model": str(start),
        "foundation.head": None,
        f"fidelities.{high}.base": None,
        f"fidelities.{high}.coupling": "independent",
        f"fidelities.{high}.base_forces_weight": 0.0,
        f"fidelities.{high}.coupling_strength": 0.0,
        "training.epochs": recipe.transfer.epochs or recipe.training.epochs,
        "export.fidelities": [high],
        "export.multihead": False,  # its other heads start from the target's and never train
        "wandb.group": recipe.wandb.group or recipe.name,
    }
    for name in recipe.fidelities:
        if name != high:
            values |= {f"fidelities.{name}.energy_weight": 0.0, f"fidelities.{name}.forces_weight": 0.0}
    return _with(recipe, values, f"{recipe.name}: transfer, second stage")
