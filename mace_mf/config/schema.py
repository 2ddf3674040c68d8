"""The recipe schema: the one place that defines every key a run understands.

A recipe is a YAML file validated into the pydantic models below. Each field carries its type,
default and documentation; the README's recipe reference and ``mace-mf recipe check`` are both
generated from these models (:mod:`mace_mf.config.messages`), so the docs cannot drift from what is
validated. Reading a file, ``--set`` overrides and path resolution are :mod:`mace_mf.config.loading`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FIDELITY_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]*$"
NAMED_FOUNDATIONS = ("mace_mp", "mace_off", "mace_anicc")  # names mace-torch's own loaders resolve
# `tied` coupling's default L2 strength: 1 and 10 tie, 0.1 is worse, on the PM6/DFT validation split
# (docs/benchmarks.md, the 600-geometry screen); the penalty is on readout weights, unitless.
TIED_STRENGTH = 1.0


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

    train: str | list[str] = Field(
        description=(
            "Training configurations: ASE-readable file(s), mace_mf store folder(s) (`mace-mf preprocess`), or "
            "mace-torch's preprocessed HDF5 (`.h5`) / LMDB (`.aselmdb`) data. Files are converted to a store once "
            "and cached by content (`store_cache`)."
        )
    )
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
    store_cache: str | None = Field(
        default=None,
        description=(
            "Folder of the stores that data files are converted to, keyed by file content and shared by every run, "
            "bench arm, sweep trial and rank; null: `$MACE_MF_CACHE/stores`, else `~/.cache/mace_mf/stores`."
        ),
    )
    preprocess_workers: int = Field(
        default=1, ge=1, description="Processes that convert a data file into its store the first time it is used."
    )
    keep_graphs: Literal["auto"] | bool = Field(
        default="auto",
        description=(
            "Hold each split's graphs in memory once built (fast epochs; about 3.4 kB per atom) or build them from the "
            "store whenever a batch needs them (flat memory, with `training.num_workers` processes). `auto`: hold a "
            "split whose graphs would take under 2 GiB."
        ),
    )
    statistics_sample: int | None = Field(
        default=100_000,
        ge=1,
        description=(
            "The E0 fit, the label variances of `training.normalise_weights` and the training split's final metrics "
            "read a seeded sample of at most this many training configurations (said in the log and the report); "
            "null: all of them."
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
    num_workers: int = Field(
        default=0,
        ge=0,
        description=(
            "DataLoader worker processes that read the store and build graphs while the model trains (for splits "
            "whose graphs are not kept in memory, `data.keep_graphs`); 0: the training process builds them."
        ),
    )
    steps_per_epoch: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Optimisation steps per epoch: the first ones of the epoch's seeded permutation (a million geometries "
            "need not be seen between two validations); null: the whole training set."
        ),
    )
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
    cueq: bool = Field(
        default=False,
        description=(
            "Train with mace-torch's cuEquivariance kernels (`pip install 'mace-mf[cueq]'`, and on a GPU its "
            "cuequivariance-ops-torch package). Every exported file is converted back to e3nn, so stock loaders "
            "without cuequivariance read it."
        ),
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


class MDOptions(_Section):
    """One short NVE run per structure and the lines it must stay within: what `mace-mf md-check` and
    the check after training both take (their defaults are these)."""

    steps: int = Field(default=100, ge=1, description="NVE velocity-Verlet steps per structure.")
    dt_fs: float = Field(default=0.5, gt=0.0, description="Time step (fs).")
    temperature_K: float = Field(default=300.0, ge=0.0, description="Initial Maxwell-Boltzmann temperature (K).")
    max_drift: float = Field(default=0.01, gt=0.0, description="Largest |total-energy drift| that passes (eV/atom/ps).")
    max_bond_stretch: float = Field(
        default=0.5, gt=0.0, description="Largest relative elongation of a starting bond that passes."
    )
    max_force: float = Field(default=50.0, gt=0.0, description="Largest force that passes (eV/Å).")
    min_distance: float = Field(default=0.5, gt=0.0, description="Closest approach of two atoms that passes (Å).")


class MDCheckSpec(MDOptions):
    """The MD stability check run on the target fidelity's model at the end of training."""

    enabled: bool = Field(default=True, description="Run `mace-mf md-check` on the target head after training.")
    structures: int = Field(
        default=3, ge=1, description="Number of starting geometries, the first of the test split (else valid)."
    )

    def options(self) -> MDOptions:
        return MDOptions(**{name: getattr(self, name) for name in MDOptions.model_fields})


class WandbSpec(_Section):
    """Weights & Biases tracking."""

    mode: Literal["online", "offline", "disabled"] = Field(default="disabled", description="W&B mode.")
    project: str = Field(default="mace-mf", description="W&B project.")
    entity: str | None = Field(default=None, description="W&B entity (team or user).")
    group: str | None = Field(default=None, description="W&B run group.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")
    name: str | None = Field(default=None, description="W&B run name; null: the recipe name.")


class TransferSpec(_Section):
    """Transfer learning after multi-fidelity fine-tuning: a second stage trains the target fidelity's
    labels alone, starting from the target model that the multi-fidelity stage exported.

    The low level's forces teach the backbone first, and the high level's own energies then move the
    target head off the low level's force error, which multi-fidelity learning keeps however many
    high-level energies there are. On B3LYP -> MP2 this beat both multi-fidelity learning and energies
    alone by 8-28 % with 13 to 268 MP2 energies; it lost to multi-fidelity learning in the seed paper's
    regime and on PM6 -> DFT (docs/benchmarks.md, "Multi-fidelity or energies alone"): `mace-mf bench`'s
    `mf-transfer` arm measures it on your data."""

    enabled: bool = Field(
        default=False,
        description=(
            "Train in two stages: the recipe into `<out>/multi-fidelity/`, then the target fidelity alone into "
            "`<out>` (its model in `<out>/models/`; the other fidelities' files stay in the first stage's folder)."
        ),
    )
    epochs: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Epochs of the second stage; null: `training.epochs`. It steps through the target-labelled "
            "configurations only, so with few of them an epoch is a few steps: raise it there."
        ),
    )


REPLAY_FIDELITY = "replay"  # the fidelity that `replay:` adds


class ReplaySpec(_Section):
    """Replay of the foundation's own level on geometries beyond the fine-tuning data: what keeps a
    fine-tuned model from forgetting what the fine-tuning data never covered (mace_mf.workflows.replay)."""

    enabled: bool = Field(default=True, description="Add the replay fidelity (`--set replay.enabled=true` adds it).")
    pool: str | list[str] | None = Field(
        default=None,
        description=(
            "Geometries to replay from (ASE files or stores; labels in them are ignored). null: generated, "
            "MD frames of the small molecules of ASE's g2 set whose elements the foundation covers, run with "
            "the foundation itself."
        ),
    )
    budget: int = Field(default=200, ge=2, description="Geometries chosen from the pool (held-out ones included).")
    selection: Literal["fps", "kmeans", "random"] = Field(
        default="fps",
        description="How they are chosen: on the foundation's descriptors (as `mace-mf select`), or a seeded draw.",
    )
    held_out: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description=(
            "Share of the chosen geometries kept out of training, on which the forgetting report measures how far "
            "the foundation's level moved (added to the validation data)."
        ),
    )
    energy_weight: float = Field(
        default=10.0,
        ge=0.0,
        description=(
            "Loss weight of the replay energies. 10 (with forces 100) held the foundation's level twice as well as "
            '1 and 10 on PM6 -> DFT, at no cost to the target (docs/benchmarks.md, "Forgetting and replay").'
        ),
    )
    forces_weight: float = Field(
        default=100.0,
        ge=0.0,
        description=(
            "Loss weight of the replay forces. Both weights 0: nothing is replayed and the report measures what "
            "fine-tuning forgets (the foundation's readout on the fine-tuned backbone)."
        ),
    )
    ride_along: bool = Field(
        default=True,
        description=(
            "Replay geometries join the fine-tuning data's batches (each batch: `training.batch_size` fine-tuning "
            "geometries and an even share of the replay set), so an epoch takes as many optimiser steps as without "
            "replay. false: they are shuffled in and make batches of their own (mace-torch's way)."
        ),
    )
    md_check: int = Field(
        default=20,
        ge=0,
        description=(
            "Held-out replay geometries on which the target head and the foundation each run `md_check`'s MD "
            "(when `md_check.enabled`): whether fine-tuning kept MD stable beyond the fine-tuning data. 0: none."
        ),
    )
    temperature: float = Field(default=500.0, gt=0.0, description="Temperature (K) of a generated pool's MD.")
    frames: int = Field(default=6, ge=1, description="Frames per molecule of a generated pool (10 MD steps apart).")


class Recipe(_Section):
    """A complete multi-fidelity fine-tuning run."""

    name: str = Field(default="mace-mf", description="Run name; default output folder runs/<name>-<timestamp>.")
    seed: int = Field(default=0, description="Seed of splits, label subsets, shuffling and initialisation.")
    dtype: Literal["auto", "float32", "float64"] = Field(
        default="auto",
        description=(
            "Floating-point precision of the model and training. `auto`: float64 on a CPU, float32 on a GPU (about "
            "twice as fast there; the E0 least-squares fit and the metrics are accumulated in float64 either way)."
        ),
    )
    device: str = Field(default="cpu", description="`cpu`, `cuda` or `cuda:<n>`.")
    num_threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "CPU threads for torch; null: the cores this process may use, divided among the runs that share them "
            "(`bench --workers`, torchrun) and less those that other processes keep busy now (runnable tasks; "
            "the load average where /proc is absent), at least 1."
        ),
    )
    foundation: FoundationSpec
    fidelities: dict[str, FidelitySpec] = Field(
        description="Fidelities by name; each becomes one readout head (order = head order)."
    )
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    md_check: MDCheckSpec = Field(default_factory=MDCheckSpec)
    replay: ReplaySpec | None = Field(
        default=None,
        description=(
            "Replay the foundation's level against forgetting: one more fidelity, `replay`, labelled by the "
            "foundation on chosen geometries, whose head starts as the foundation's readout; every element of "
            "the foundation is kept. null: no replay."
        ),
    )
    transfer: TransferSpec = Field(default_factory=TransferSpec)
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
    def _resolved_dtype(self) -> Recipe:
        if self.dtype == "auto":  # resolved, so the resolved recipe says what ran
            self.dtype = "float32" if self.device.startswith("cuda") else "float64"
        return self

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
        if self.transfer.enabled and len(declared) < 2:
            raise ValueError("transfer.enabled: the first stage needs a fidelity besides the target; declare one")
        if self.transfer.enabled and self.replay is not None:
            raise ValueError(
                "transfer.enabled with replay: the second stage would replay the first stage's model, not the "
                "foundation; drop `replay:` or set transfer.enabled=false"
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
