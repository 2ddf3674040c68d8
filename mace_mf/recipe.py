"""The recipe: the one place that defines every key a run understands.

A recipe is a YAML file validated into the pydantic models below. Each field carries its type,
default and documentation; the README's recipe reference and ``mace-mf recipe check`` are both
generated from these models, so the docs cannot drift from what is validated.

Relative paths are resolved against the folder of the recipe file, so a recipe can be moved
together with its data. Validation errors are turned into one line naming the file, the dotted key
and the fix (with a did-you-mean for misspelt keys).
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mace_mf.errors import RecipeError

FIDELITY_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]*$"
# `tied` coupling's default L2 strength: 1 and 10 tie, 0.1 is worse, on the PM6/DFT validation split
# (docs/benchmarks.md, the 600-geometry screen); the penalty is on readout weights, unitless.
TIED_STRENGTH = 1.0
# Names users bring from mace_run_train flags, mapped to ours, for did-you-mean hints.
FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "max_num_epochs": "epochs",
    "ema": "ema_decay",
    "default_dtype": "dtype",
    "foundation_model": "foundation",
    "clip_grad": "clip_grad_norm",
    "patience": "early_stopping_patience",
    "valid_file": "valid",
    "train_file": "train",
    "test_file": "test",
}


class _Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FoundationSpec(_Section):
    """Where the pretrained MACE comes from."""

    model: str = Field(
        description=(
            "A local MACE `.model` file (path relative to the recipe), or a named foundation "
            "`mace_mp:<size>`, `mace_off:<size>` or `mace_anicc` fetched by mace-torch's loaders."
        )
    )
    head: str | None = Field(
        default=None,
        description="Head of a multi-head foundation whose weights start every fidelity head.",
    )
    elements: Literal["data", "all"] = Field(
        default="data",
        description=(
            "`data`: keep only the elements found in the train/valid/test data (as mace_run_train "
            "does): the other elements' weights are dropped, each step is faster (about 1.4x for "
            "SPICE's 15 elements cut to C, H, N, O) and the exported files cover the data's elements "
            "only. `all`: keep every element of the foundation in the fine-tuned model."
        ),
    )


class LabelSpec(_Section):
    """Labels of a fidelity computed by a calculator before training (``mace-mf label``'s engine)."""

    calculator: str = Field(
        description=(
            "`gfn2-xtb` or `gfn1-xtb` (tblite; per configuration `atoms.info` `charge`, and "
            "`multiplicity` or `spin` (2S+1) or `uhf` (unpaired electrons); default neutral, lowest "
            "spin), `mace:PATH[:head]` (pseudo-labels of a MACE file), `foundation` (the recipe's own "
            "foundation file: a regulariser against forgetting), or `module.path:ClassName` (any ASE "
            "calculator)."
        )
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the calculator (e.g. `{accuracy: 0.1}` for tblite)."
    )
    workers: int = Field(default=1, ge=1, description="Worker processes that label in parallel (one thread each).")
    splits: list[Literal["train", "valid", "test"]] = Field(
        default_factory=lambda: ["train", "valid", "test"],
        description="Which data files to label; the others keep only the labels they already carry.",
    )
    overwrite: bool = Field(
        default=False,
        description="Replace labels the files already hold under this fidelity's keys (else that is an error).",
    )

    @field_validator("splits")
    @classmethod
    def _some_splits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("an empty list; name at least one of train, valid, test")
        return value


class FidelitySpec(_Section):
    """One level of theory: where its labels live and how much the loss weighs them."""

    energy_key: str | None = Field(
        default=None,
        description=(
            "Key of the total energy (eV) in `atoms.info`; `energy` also reads an attached "
            "calculator's result. null: this fidelity has no energy labels."
        ),
    )
    forces_key: str | None = Field(
        default=None,
        description=(
            "Key of the forces (eV/Å, shape [n_atoms, 3]) in `atoms.arrays`; `forces` also reads "
            "an attached calculator's result. null: this fidelity has no force labels."
        ),
    )
    energy_weight: float = Field(default=1.0, ge=0.0, description="Loss weight of the energy-per-atom MSE (eV²/atom²).")
    forces_weight: float = Field(
        default=10.0,
        ge=0.0,
        description=(
            "Loss weight of the force-component MSE (eV²/Å²). 0 with forces present: forces are "
            "evaluated but never trained on."
        ),
    )
    e0s: Literal["fit", "foundation"] | dict[str, float] = Field(
        default="fit",
        description=(
            "Atomic reference energies of this head: `fit` (least squares on label − foundation "
            "prediction over the training set), `foundation` (keep the foundation's), or a "
            "mapping element symbol → eV."
        ),
    )
    label_fraction: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description=(
            "Keep this fidelity's training labels on only this seeded fraction of the training "
            "geometries (learning curves without new data files)."
        ),
    )
    label_selection: Literal["random", "fps", "kmeans", "disagreement"] = Field(
        default="random",
        description=(
            "Which training geometries keep the labels when `label_fraction` < 1: `random` (seeded), `fps` "
            "(farthest-point sampling in the foundation's descriptor space), `kmeans` (the geometry nearest each "
            "k-means centre there), `disagreement` (where the foundation's "
            "forces are farthest from the `base` fidelity's); what `mace-mf select` does to a pool."
        ),
    )
    base: str | None = Field(
        default="auto",
        description=(
            "A lower-level fidelity this head leans on (`coupling`, `base_forces_weight`), e.g. `pm6` "
            "for a `dft` head with energies only. `auto`: for a fidelity whose forces are not trained "
            "on, the first declared fidelity whose forces are; otherwise none. null: none."
        ),
    )
    coupling: Literal["independent", "delta", "tied"] = Field(
        default="tied",
        description=(
            "How this head relates to `base` (when it has one): `tied` (own readout, started as a "
            "copy of the base's and pulled toward it by an L2 penalty of `coupling_strength`; the "
            "best option measured, docs/benchmarks.md), `delta` (energy = base head + a correction "
            "readout that starts at zero, so the head starts with the base's forces), `independent` "
            "(own readout, as mace-torch's multi-head fine-tuning)."
        ),
    )
    coupling_strength: float | None = Field(
        default=None,
        ge=0.0,
        description=(
            "`tied`: L2 penalty on the difference between this head's and the base's readout "
            "weights; `delta`: L2 penalty on the correction readout's output weights. 0: none; "
            f"null: the value chosen on validation data ({TIED_STRENGTH:g} for `tied`, 0 for `delta`)."
        ),
    )
    base_forces_weight: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "Loss weight of a weak prior pulling this head's forces toward the base fidelity's force "
            "labels (eV²/Å²), where this fidelity's own forces are not trained on. 0: off."
        ),
    )
    labels: LabelSpec | None = Field(
        default=None,
        description=(
            "Compute this fidelity's labels with a calculator before training, cached by file content "
            "and calculator in `data.label_cache`; `energy_key`/`forces_key` then default to "
            "`<name>_energy`/`<name>_forces`. null: the labels are in the data files."
        ),
    )


class DataSpec(_Section):
    """Which files hold the configurations and how they are split."""

    train: str | list[str] = Field(description="ASE-readable file(s) of training configurations.")
    valid: str | list[str] | None = Field(
        default=None, description="Validation file(s); null: split off `valid_fraction` of train."
    )
    test: str | list[str] | None = Field(
        default=None, description="Test file(s); null: split off `test_fraction` of train."
    )
    valid_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of train held out when `valid` is null."
    )
    test_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Share of train held out when `test` is null."
    )
    valid_pairs: str | list[str] | None = Field(
        default=None,
        description=(
            "Displacement pairs of validation geometries (`mace-mf displace`, then labelled with energies by "
            "`mace-mf label --energies-only`): each fidelity with energies on both halves of a pair is scored on "
            "the directional force -(E(x+δu) - E(x-δu))/2δ against the model's F·u. `fd_rmse_meV_A` of the "
            "valid split estimates the force RMSE without a single force label; `mace-mf bench` and "
            "`mace-mf sweep` decide on it where the validation data have no high-level forces. null: none."
        ),
    )
    format: str | None = Field(default=None, description="ASE format name; null: guessed from the file name.")
    max_train: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Train on a seeded subset of at most this many configurations (taken after validation "
            "and test are split off): quick benchmarks and learning curves in geometries. null: all."
        ),
    )
    label_cache: str | None = Field(
        default=None,
        description=(
            "Folder of labels computed for `fidelities.<name>.labels`, reused by every run whose files "
            "and calculator match; null: `label-cache/` next to the run folder."
        ),
    )

    @field_validator("train", "valid", "test", "valid_pairs")
    @classmethod
    def _non_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list of files; give at least one path")
        return value


class TrainingSpec(_Section):
    """Optimisation of the fidelity heads and the shared backbone."""

    epochs: int = Field(
        default=30, ge=0, description="Passes over the training set; 0 exports the foundation with refitted E0s."
    )
    batch_size: int = Field(default=16, ge=1, description="Configurations per optimisation step.")
    eval_batch_size: int = Field(default=32, ge=1, description="Configurations per evaluation batch.")
    lr: float = Field(default=1e-3, gt=0.0, description="Base learning rate.")
    optimizer: Literal["adam", "adamw"] = Field(default="adam", description="Optimizer.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="Weight decay (decoupled for adamw).")
    lr_factors: dict[Literal["embedding", "interactions", "products", "readouts"], float] = Field(
        default_factory=dict,
        description=(
            "Multiply the base learning rate per block (embedding, interactions, products, "
            "readouts); a factor 0 freezes that block."
        ),
    )
    freeze_backbone_epochs: int = Field(
        default=0,
        ge=0,
        description="Heads-only warm-up: train only the readouts for this many epochs first.",
    )
    ema_decay: float | None = Field(
        default=0.99,
        ge=0.0,
        lt=1.0,
        description="Exponential moving average of the weights used for evaluation; null: off.",
    )
    clip_grad_norm: float | None = Field(
        default=10.0, gt=0.0, description="Clip the gradient norm to this value; null: off."
    )
    scheduler_patience: int = Field(
        default=5, ge=1, description="Epochs without validation improvement before the LR drops."
    )
    scheduler_factor: float = Field(default=0.5, gt=0.0, lt=1.0, description="LR multiplier on a plateau.")
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after this many epochs without improvement; null: off."
    )
    fidelity_embedding: bool = Field(
        default=False,
        description=(
            "Condition the backbone on the fidelity (SevenNet-MF style): a learned vector per "
            "fidelity added to the node embedding, so heads differ inside the network. Costs one "
            "backbone pass per fidelity; single-head exports fold it in, `multihead.model` is not written."
        ),
    )
    normalise_weights: bool = Field(
        default=False,
        description=(
            "Divide each fidelity's energy and forces weights by the variance of its training "
            "labels (energy per atom after a per-element fit; force components), so weights are "
            "relative and no fidelity dominates by its units or spread alone."
        ),
    )
    target: str | None = Field(
        default=None,
        description=(
            "Fidelity whose validation loss picks the best checkpoint and drives the scheduler; "
            "null: the last declared fidelity."
        ),
    )
    select_on: Literal["all", "target"] = Field(
        default="all",
        description=(
            "Validation loss that picks the best checkpoint and drives the scheduler: `all` (every fidelity's "
            "weighted terms, as in the training loss) or `target` (the target fidelity's alone; a target with no "
            "weighted term is judged by `all`). With 8 high-level energies, `target` kept early epochs that had "
            "not learnt the low level's forces yet (docs/benchmarks.md, seed regime)."
        ),
    )


class ExportSpec(_Section):
    """Files written under `<out>/models/`."""

    fidelities: list[str] | None = Field(
        default=None, description="Fidelities exported as single-head files; null: all."
    )
    multihead: bool = Field(default=True, description="Also write `multihead.model` with every head.")
    torchscript: bool = Field(
        default=True, description="Also write `<fidelity>.compiled.model` (TorchScript) per head."
    )
    lammps: bool = Field(
        default=False,
        description="Also write `<fidelity>.model-lammps.pt` per head for LAMMPS `pair_style mace`, as "
        "mace-torch's `mace_create_lammps_model` makes it (float64, `LAMMPS_MACE`, TorchScript).",
    )


class MDCheckSpec(_Section):
    """The MD stability check run on the target fidelity's model at the end of training."""

    enabled: bool = Field(default=True, description="Run `mace-mf md-check` on the target head after training.")
    structures: int = Field(
        default=3, ge=1, description="Number of starting geometries, the first of the test split (else valid)."
    )
    steps: int = Field(default=100, ge=1, description="NVE velocity-Verlet steps per structure.")
    dt_fs: float = Field(default=0.5, gt=0.0, description="Time step (fs).")
    temperature_K: float = Field(default=300.0, ge=0.0, description="Initial Maxwell-Boltzmann temperature (K).")
    max_drift: float = Field(default=0.01, gt=0.0, description="Largest |total-energy drift| that passes (eV/atom/ps).")
    max_bond_stretch: float = Field(
        default=0.5, gt=0.0, description="Largest relative elongation of a starting bond that passes."
    )
    max_force: float = Field(default=50.0, gt=0.0, description="Largest force that passes (eV/Å).")


class WandbSpec(_Section):
    """Weights & Biases tracking."""

    mode: Literal["online", "offline", "disabled"] = Field(default="disabled", description="W&B mode.")
    project: str = Field(default="mace-mf", description="W&B project.")
    entity: str | None = Field(default=None, description="W&B entity (team or user).")
    group: str | None = Field(default=None, description="W&B run group.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")
    name: str | None = Field(default=None, description="W&B run name; null: the recipe name.")


class Recipe(_Section):
    """A complete multi-fidelity fine-tuning run."""

    name: str = Field(default="mace-mf", description="Run name; default output folder runs/<name>-<timestamp>.")
    seed: int = Field(default=0, description="Seed of splits, label subsets, shuffling and initialisation.")
    dtype: Literal["float32", "float64"] = Field(default="float64", description="Floating-point precision.")
    device: str = Field(default="cpu", description="`cpu`, `cuda` or `cuda:<n>`.")
    num_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for torch; null: torch's default. Small models often run fastest on 1.",
    )
    foundation: FoundationSpec
    fidelities: dict[str, FidelitySpec] = Field(
        description="Fidelities by name; each becomes one readout head (order = head order)."
    )
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    md_check: MDCheckSpec = Field(default_factory=MDCheckSpec)
    wandb: WandbSpec = Field(default_factory=WandbSpec)

    @field_validator("fidelities")
    @classmethod
    def _fidelity_names(cls, value: dict[str, FidelitySpec]) -> dict[str, FidelitySpec]:

        if not value:
            raise ValueError("no fidelities declared; add at least one under `fidelities:`")
        for name, spec in value.items():
            if not re.match(FIDELITY_NAME_PATTERN, name):
                raise ValueError(
                    f"fidelity name {name!r} is not allowed; use letters, digits, _ and -, starting with a letter"
                )
            if spec.labels is not None:
                # Computed labels need keys to live under; unset keys take the `mace-mf label` names.
                if "energy_key" not in spec.model_fields_set:
                    spec.energy_key = f"{name}_energy"
                if "forces_key" not in spec.model_fields_set:
                    spec.forces_key = f"{name}_forces"
            if spec.energy_key is None and spec.forces_key is None:
                raise ValueError(f"fidelity {name!r} has neither energy_key nor forces_key; set at least one")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:

        if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", value):
            raise ValueError(f"{value!r} is not a device; use cpu, cuda or cuda:<n>")
        return value

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        declared = list(self.fidelities)
        if self.training.target is not None and self.training.target not in declared:
            raise ValueError(
                f"training.target {self.training.target!r} is not a declared fidelity {declared}; "
                "use one of the declared names"
            )
        for name, spec in self.fidelities.items():
            if spec.base == "auto":
                spec.base = _auto_base(name, self.fidelities)
        for name, spec in self.fidelities.items():
            where = f"fidelities.{name}"
            if spec.coupling_strength is None:  # resolved, so the resolved recipe says what ran
                spec.coupling_strength = TIED_STRENGTH if spec.coupling == "tied" and spec.base else 0.0
            if spec.base is None:
                explicit = "coupling" in spec.model_fields_set and spec.coupling != "independent"
                if explicit or spec.base_forces_weight > 0:
                    raise ValueError(f"{where}: coupling {spec.coupling!r} and base_forces_weight need `base:`")
                spec.coupling = "independent"  # what runs; the resolved recipe says so
                continue
            if spec.base not in declared or spec.base == name:
                raise ValueError(f"{where}.base: {spec.base!r} must be another declared fidelity {declared}")
            if spec.base_forces_weight > 0 and self.fidelities[spec.base].forces_key is None:
                raise ValueError(f"{where}.base_forces_weight: base {spec.base!r} has no forces_key")
        for name in self.fidelities:
            seen = [name]
            while (base := self.fidelities[seen[-1]].base) is not None:
                if base in seen:
                    raise ValueError(f"fidelities: `base` forms a cycle {' -> '.join([*seen, base])}")
                seen.append(base)
        for name in self.export.fidelities or []:
            if name not in declared:
                raise ValueError(
                    f"export.fidelities: {name!r} is not a declared fidelity {declared}; use one of the declared names"
                )
        return self

    @property
    def target(self) -> str:
        """The fidelity that selects checkpoints (explicit, or the last declared)."""
        return self.training.target or list(self.fidelities)[-1]

    @property
    def export_fidelities(self) -> list[str]:
        return self.export.fidelities or list(self.fidelities)


def _trains_forces(spec: FidelitySpec) -> bool:
    return spec.forces_key is not None and spec.forces_weight > 0


def _auto_base(name: str, fidelities: dict[str, FidelitySpec]) -> str | None:
    """``base: auto``: a head not trained on forces leans on the first one that is."""
    if _trains_forces(fidelities[name]):
        return None
    return next((other for other, spec in fidelities.items() if other != name and _trains_forces(spec)), None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}; each key (and fidelity name) may appear once",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# pydantic appends the tried union member or a mapping-key marker to a location: not recipe keys.
_LOC_TAGS = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|\[key\])$")


def _key_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(part for part in loc if not (isinstance(part, str) and _LOC_TAGS.match(part)))


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _suggest(loc: tuple[Any, ...]) -> str:
    """A did-you-mean for an unknown key, drawn from the fields of the section it sits in."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            # Inside a mapping (fidelities.<name>): the value type is the next model.
            if model is Recipe:
                return ""
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif _optional_model(annotation) is not None:
            model = _optional_model(annotation)  # type: ignore[assignment]
        elif str(part) == "fidelities":
            model = FidelitySpec
    familiar = FAMILIAR_NAMES.get(str(loc[-1]))
    if familiar in model.model_fields:
        return f" (did you mean {familiar!r}?)"
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(model.model_fields)})"


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line for the first problem: file, dotted key, what is wrong and how to fix it."""
    errors = error.errors()
    # A misspelt key also makes the intended one "missing": name the misspelling, with a did-you-mean.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = _key_path(tuple(first["loc"]))
    key = _dotted(loc)
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}{_suggest(loc)}"
    if first["type"] == "missing":
        return f"{source}: missing required key {key!r}; add it (every key: `mace-mf recipe reference`)"
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
    return f"{source}: {key + ': ' if key else ''}{message}{shown}{_expected(loc)}"


def _field_at(loc: tuple[Any, ...]) -> Any:
    """The pydantic field a validation error's location points at, or None (mapping entries, unions)."""
    model: type[BaseModel] = Recipe
    field = None
    parts = [str(p) for p in loc]
    i = 0
    while i < len(parts):
        field = model.model_fields.get(parts[i])
        if field is None:
            return None
        if model is Recipe and parts[i] == "fidelities":
            if len(parts) < 3:
                return field
            model, i = FidelitySpec, i + 2
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif i < len(parts) - 1:
            return None  # inside a list or dict value
        i += 1
    return field


def _expected(loc: tuple[Any, ...]) -> str:
    """ "; expected <type> (default <value>)" for a scalar key, so the message says what to write."""
    if len(loc) == 2 and loc[0] == "fidelities":
        return "; expected a mapping such as {energy_key: dft_energy, forces_key: dft_forces}"
    field = _field_at(loc)
    if field is None or (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
        return ""
    if field.is_required():
        default = "required"
    elif field.default_factory is not None:
        default = f"default {field.default_factory()}"
    else:
        default = f"default {'null' if field.default is None else field.default}"
    return f"; expected {_type_name(field.annotation).replace(chr(92), '')} ({default}; see `mace-mf recipe reference`)"


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` in nested dicts, creating sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def dotted_key_problem(recipe: Recipe, dotted: str) -> str | None:
    """Why ``dotted`` names no value of ``recipe`` (None when it does): what sweeps check before
    running a single trial, with the same did-you-mean hints as recipe files."""
    model: type[BaseModel] | None = Recipe
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        part = parts[i]
        if model is None:
            return f"{'.'.join(parts[:i])!r} is a value, not a section"
        if model is Recipe and part == "fidelities":
            if i + 1 >= len(parts) or parts[i + 1] not in recipe.fidelities:
                return f"{dotted!r}: give a declared fidelity after `fidelities.` ({', '.join(recipe.fidelities)})"
            model, i = FidelitySpec, i + 2
            continue
        field = model.model_fields.get(part)
        if field is None:
            return f"unknown key {dotted!r}{_suggest(tuple(parts[: i + 1]))}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif str(annotation).startswith("dict[") and i + 2 == len(parts):
            return None  # one entry of a mapping such as training.lr_factors.readouts
        else:
            model = None
        i += 1
    if model is not None:
        return f"{dotted!r} is a section; name one of its keys ({', '.join(model.model_fields)})"
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``dotted.key=value``; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected dotted.key=value, e.g. training.lr=0.0005")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text!r}: value is not valid YAML ({exc.problem})") from None


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def resolve(path: str) -> str:
        return str((base / path).resolve()) if not Path(path).is_absolute() else path

    def resolve_many(value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return None
        return [resolve(p) for p in value] if isinstance(value, list) else resolve(value)

    model = recipe.foundation.model
    if not model.startswith(("mace_mp", "mace_off", "mace_anicc")):
        recipe.foundation.model = resolve(model)
    recipe.data.train = resolve_many(recipe.data.train)  # type: ignore[assignment]
    recipe.data.valid = resolve_many(recipe.data.valid)
    recipe.data.test = resolve_many(recipe.data.test)
    recipe.data.valid_pairs = resolve_many(recipe.data.valid_pairs)
    if recipe.data.label_cache is not None:
        recipe.data.label_cache = resolve(recipe.data.label_cache)
    for spec in recipe.fidelities.values():
        calculator = spec.labels.calculator if spec.labels is not None else ""
        if spec.labels is not None and calculator.startswith("mace:"):
            spec.labels.calculator = "mace:" + resolve(calculator[len("mace:") :])
    return recipe


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), values: dict[str, Any] | None = None
) -> Recipe:
    """Read, override (``--set`` texts, then already parsed ``values`` by dotted key), validate and
    path-resolve a recipe file. Sweeps pass their parameters as ``values`` so that a number stays the
    number the sweep file gave (``1e-3`` read back as YAML text would be a string)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found; check the path") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror}); check the path and its permissions") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}:{where}: malformed YAML ({problem}); fix the syntax") from None
    if tree is None:
        raise RecipeError(f"{path}: the recipe is empty; see recipes/quickstart.yaml for an example")
    if not isinstance(tree, dict):
        raise RecipeError(
            f"{path}: a recipe must be a mapping of sections, got {type(tree).__name__}; write "
            "`section: {key: value}` lines (see recipes/quickstart.yaml)"
        )
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(tree, key, value)
    for key, value in (values or {}).items():
        set_dotted(tree, key, value)
    return recipe_from_dict(tree, source=str(path), base=path.resolve().parent)


def recipe_from_dict(tree: dict[str, Any], source: str, base: Path) -> Recipe:
    """Validate an already parsed recipe; ``base`` resolves relative paths."""
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(source, exc)) from None
    return _resolve_paths(recipe, base)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe, defaults included, as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def recipe_changes(before: Recipe, after: Recipe) -> list[str]:
    """The dotted keys whose resolved values differ, as ``key: old -> new`` (empty when equal).

    Used wherever a run folder is reused (resume, the benchmark's finished arms): a folder trained
    with other settings, or under an older default, must be named, not silently taken as this run.
    """

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict) and tree:
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): tree}

    old, new = flat(before.model_dump(mode="json")), flat(after.model_dump(mode="json"))
    unset = "(unset)"
    keys = sorted(old.keys() | new.keys())
    return [f"{k}: {old.get(k, unset)} -> {new.get(k, unset)}" for k in keys if old.get(k, unset) != new.get(k, unset)]


def reference_markdown() -> str:
    """The recipe reference (every key, type, default, meaning) generated from the schema."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            key = f"{prefix}{name}"
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{key}.")
                continue
            optional_model = _optional_model(annotation)
            if optional_model is not None:
                doc = (field.description or "").replace("|", "\\|")
                lines.append(f"| `{key}` | {optional_model.__name__} \\| null | `null` | {doc} |")
                walk(optional_model, f"{key}.")
                continue
            if name == "fidelities" and model is Recipe:
                walk(FidelitySpec, f"{key}.<name>.")
                continue
            type_name = _type_name(annotation)
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = f"`{field.default_factory()}`"
            else:
                default = f"`{field.default}`" if field.default is not None else "`null`"
            doc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {type_name} | {default} | {doc} |")

    walk(Recipe, "")
    return "\n".join(lines)


def _optional_model(annotation: Any) -> type[BaseModel] | None:
    """The model of an optional section (``LabelSpec | None``), else None."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
        return members[0]
    return None


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "null")
    text = text.replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")
