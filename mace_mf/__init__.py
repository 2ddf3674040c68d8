"""mace_mf: multi-fidelity fine-tuning of foundation MACE interatomic potentials.

The public API (what the CLI calls; everything else may move between releases)::

    import mace_mf

    recipe = mace_mf.load_recipe("recipe.yaml", ["training.lr=5e-4"])   # validated, paths resolved
    run = mace_mf.train(recipe, "runs/mf")                              # a run folder
    metrics = mace_mf.evaluate(run, ["more_data.xyz"])                  # every head, every label
    files = mace_mf.export(run, "exported", fidelities=["dft"])        # stock MACE files
    model = mace_mf.load_model(run / "models" / "dft.model")            # a torch module

Names are imported on first use, so ``import mace_mf`` (and the CLI's ``--help``) does not load
torch. Layers, bottom to top (a module imports only from its own layer and the ones below):
``errors``/``files``/``run_folder``/``quiet``/``version`` < ``config`` < ``labels`` < ``model`` <
``data`` < ``evaluation`` < ``train`` < ``workflows`` < ``cli`` and this API.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mace_mf.version import __version__

if TYPE_CHECKING:
    import torch

    from mace_mf.config.schema import Recipe

__all__ = ["Recipe", "__version__", "evaluate", "export", "load_model", "load_recipe", "train"]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read and validate a recipe file; ``overrides`` are ``dotted.key=value`` texts (``--set``)."""
    from mace_mf.config.loading import load_recipe as load

    return load(path, overrides)


def train(recipe: Recipe | str | Path, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run a recipe (a :class:`Recipe` or a recipe file) into the run folder ``out``; return it."""
    from mace_mf.config.schema import Recipe
    from mace_mf.workflows.run import train_run

    recipe_file = None if isinstance(recipe, Recipe) else Path(recipe)
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return train_run(loaded, Path(out), recipe_file=recipe_file, resume=resume, overwrite=overwrite)


def evaluate(
    model_or_run: str | Path,
    data: list[str | Path],
    heads: list[str] | None = None,
    energy_key: str = "{head}_energy",
    forces_key: str = "{head}_forces",
    batch_size: int = 32,
    pairs: list[str | Path] | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics per head of a model file (or a run's multi-head model) on labelled files; a run folder
    supplies its recipe's label keys, a bare file the ``{head}`` templates."""
    from mace_mf.evaluation.inference import evaluate_model_file

    files = [str(p) for p in data]
    return evaluate_model_file(
        Path(model_or_run), files, heads, energy_key, forces_key, batch_size, [str(p) for p in pairs or []]
    )


def export(
    model_or_run: str | Path,
    out: str | Path,
    fidelities: list[str] | None = None,
    torchscript: bool = True,
    lammps: bool = False,
) -> list[Path]:
    """Single-head, multi-head, TorchScript (and LAMMPS) files of a model or run, in a new folder."""
    from mace_mf.model.export import export_file

    return export_file(Path(model_or_run), Path(out), fidelities, torchscript, lammps)


def load_model(model_or_run: str | Path) -> torch.nn.Module:
    """A MACE model file (or a run's multi-head model) as a float64 module on the CPU."""
    from mace_mf.model.foundation import load_model_file

    return load_model_file(Path(model_or_run))[0]


def __getattr__(name: str) -> Any:
    if name == "Recipe":
        return importlib.import_module("mace_mf.config.schema").Recipe
    raise AttributeError(f"module 'mace_mf' has no attribute {name!r}")
