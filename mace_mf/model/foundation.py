"""Obtaining a pretrained MACE and describing it.

A foundation is either a local ``.model`` file (a pickled mace-torch module) or a name that
mace-torch's own loaders resolve (``mace_mp:<size>``, ``mace_off:<size>``, ``mace_anicc``). Named
foundations download when online; offline, the error says exactly which file to place where, so a
user on an air-gapped cluster can copy it in by hand.

Old pickles (2022-era) lack attributes that mace-torch 0.3.16 reads (``num_interactions``, a tensor
``r_max``, tensor ``atomic_numbers``): they are upgraded in memory with a logged notice, never
rewritten on disk.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mace  # noqa: F401  (must precede e3nn: mace relaxes torch.load for e3nn's constants)
import torch
from ase.data import chemical_symbols
from mace.modules.models import ScaleShiftMACE

from mace_mf.errors import DataError, FoundationError
from mace_mf.quiet import torchscript_quiet
from mace_mf.run_folder import RunFolder

log = logging.getLogger(__name__)

NAMED_PREFIXES = ("mace_mp", "mace_off", "mace_anicc")


@dataclass(frozen=True)
class FoundationInfo:
    """What a run needs to know about its foundation."""

    source: str
    atomic_numbers: tuple[int, ...]
    r_max: float
    heads: tuple[str, ...]
    head: str
    dtype: torch.dtype
    num_parameters: int
    upgraded: tuple[str, ...]

    @property
    def elements(self) -> list[str]:
        return [chemical_symbols[z] for z in self.atomic_numbers]


def _named_cache_path(kind: str, size: str | None) -> Path:
    """Where mace-torch's loader keeps (or expects) a named foundation's file."""
    from mace.calculators import foundations_models as fm
    from mace.tools.utils import get_cache_dir

    if kind == "mace_mp":
        url = fm.mace_mp_urls.get(size or "medium")
        if url is None:
            raise FoundationError(
                f"foundation.model: unknown mace_mp size {size!r}; choose one of "
                f"{', '.join(k for k in fm.mace_mp_urls)}"
            )
    elif kind == "mace_off":
        url = fm.mace_off_urls.get(size or "medium")
        if url is None:
            raise FoundationError(
                f"foundation.model: unknown mace_off size {size!r}; choose one of {', '.join(fm.mace_off_urls)}"
            )
    else:
        return Path(fm.module_dir) / "foundations_models" / "ani500k_large_CC.model"
    return Path(get_cache_dir()) / os.path.basename(url).split("?")[0]


def _load_named(spec: str) -> torch.nn.Module:
    kind, _, size = spec.partition(":")
    if kind not in NAMED_PREFIXES:
        raise FoundationError(
            f"foundation.model: {spec!r} is neither a file nor one of mace_mp:<size>, mace_off:<size>, mace_anicc"
        )
    cache = _named_cache_path(kind, size or None)
    if cache.is_file():
        return _load_file(cache)
    from mace.calculators import foundations_models as fm

    try:
        if kind == "mace_mp":
            model = fm.mace_mp(model=size or None, return_raw_model=True, device="cpu")
        elif kind == "mace_off":
            model = fm.mace_off(model=size or None, return_raw_model=True, device="cpu")
        else:
            model = fm.mace_anicc(device="cpu", return_raw_model=True)
    except Exception as exc:  # mace raises RuntimeError/URLError/OSError offline
        raise FoundationError(
            f"foundation.model: could not download {spec!r} ({type(exc).__name__}); when offline, "
            f"copy the file to {cache} or point foundation.model at a local .model file"
        ) from None
    return model


def _load_file(path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise FoundationError(f"foundation.model: {path} not found; give a MACE .model file")
    try:
        model = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # unpickling a damaged file raises anything (EOFError, OSError, BadZipFile...)
        head = path.read_bytes()[:512]
        if head and not head.startswith((b"PK", b"\x80")) and _is_text(head):  # not a zip or pickle: text
            raise FoundationError(
                f"foundation.model: {path} is a text file, not a MACE model (a .model file is a torch "
                "pickle, as mace-torch saves it); give a MACE .model file"
            ) from None
        raise FoundationError(
            f"foundation.model: {path} is not a loadable MACE model "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); is the file truncated?"
        ) from None
    if isinstance(model, dict):
        raise FoundationError(
            f"foundation.model: {path} holds a state dict/checkpoint, not a model; "
            "export a full model (mace's `.model`) and point at it"
        )
    return model


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _upgrade(model: torch.nn.Module) -> list[str]:
    """Set attributes that mace-torch 0.3.16 expects but old pickles lack; return what changed."""
    changed: list[str] = []
    if not isinstance(model.r_max, torch.Tensor):
        model.r_max = torch.tensor(float(model.r_max))
        changed.append("r_max became a tensor")
    if not isinstance(model.atomic_numbers, torch.Tensor):
        model.atomic_numbers = torch.tensor(list(model.atomic_numbers), dtype=torch.int64)
        changed.append("atomic_numbers became a tensor")
    if not hasattr(model, "num_interactions"):
        model.num_interactions = torch.tensor(len(model.interactions), dtype=torch.int64)
        changed.append("num_interactions was set")
    return changed


def load_foundation(
    spec: str, head: str | None, dtype: torch.dtype, any_head: bool = False
) -> tuple[ScaleShiftMACE, FoundationInfo]:
    """Load a foundation, check it is a ScaleShiftMACE, pick its head and convert its dtype.

    ``any_head``: a multi-head file without a chosen head is fine (evaluation reads every head).

    The dtype is converted before anything evaluates the model: a float32 foundation used in a
    float64 run otherwise crashes mace's TorchScript tensordot.
    """
    is_named = spec.startswith(NAMED_PREFIXES) and not Path(spec).exists()
    if not is_named and not Path(spec).exists() and ":" in Path(spec).name:
        raise FoundationError(
            f"foundation.model: {Path(spec).name!r} is neither a file nor a named foundation; "
            "use mace_mp:<size>, mace_off:<size>, mace_anicc or a .model path"
        )
    model = _load_named(spec) if is_named else _load_file(Path(spec))
    if not isinstance(model, ScaleShiftMACE):
        raise FoundationError(
            f"foundation.model: {spec} is a {type(model).__name__}; mace_mf fine-tunes "
            "ScaleShiftMACE models (MACE-MP, MACE-OFF and mace_run_train outputs)"
        )
    if hasattr(model, "joint_embedding") or hasattr(model, "embedding_readout"):
        raise FoundationError(f"foundation.model: {spec} uses extra embeddings (charge/spin); not supported yet")
    upgraded = _upgrade(model)
    if upgraded:
        log.warning("foundation %s is an old MACE pickle, upgraded in memory: %s", spec, "; ".join(upgraded))
    heads = list(getattr(model, "heads", None) or ["Default"])
    if head is None:
        if len(heads) > 1 and not any_head:
            raise FoundationError(
                f"foundation.head: {spec} has heads {heads}; choose the starting head with foundation.head"
            )
        head = heads[0]
    elif head not in heads:
        raise FoundationError(f"foundation.head: {head!r} is not a head of {spec} (heads: {heads})")
    model = model.to(dtype)
    model.eval()
    info = FoundationInfo(
        source=spec,
        atomic_numbers=tuple(int(z) for z in model.atomic_numbers),
        r_max=float(model.r_max),
        heads=tuple(heads),
        head=head,
        dtype=dtype,
        num_parameters=sum(p.numel() for p in model.parameters()),
        upgraded=tuple(upgraded),
    )
    return model, info


def keep_elements(single: ScaleShiftMACE, info: FoundationInfo, atomic_numbers: list[int]) -> ScaleShiftMACE:
    """A copy of a single-head foundation that knows only ``atomic_numbers`` (a subset of its own).

    Every per-element weight (node embedding, skip connections, symmetric contractions, E0s) of the
    other elements is dropped, as ``mace_run_train`` does when it fine-tunes: each training step is
    then cheaper (the symmetric contraction and skip products scale with the number of elements),
    and on the kept elements the copy is the same function (mace-torch's own
    ``load_foundations_elements`` rescales the one-hot embeddings; a test checks energies and forces).
    """
    from mace.tools.finetuning_utils import load_foundations_elements
    from mace.tools.scripts_utils import extract_config_mace_model
    from mace.tools.utils import AtomicNumberTable

    own = [int(z) for z in single.atomic_numbers]
    index = [own.index(z) for z in atomic_numbers]
    dtype = next(single.parameters()).dtype
    try:
        config = extract_config_mace_model(single)
        config.update(
            atomic_numbers=list(atomic_numbers),
            num_elements=len(atomic_numbers),
            atomic_energies=single.atomic_energies_fn.atomic_energies[..., index].detach().cpu().numpy(),
        )
        with torchscript_quiet():  # building a MACE scripts every e3nn layer
            model = type(single)(**config).to(dtype)
        load_foundations_elements(
            model,
            single,
            AtomicNumberTable(list(atomic_numbers)),
            load_readout=True,
            use_shift=True,
            use_scale=True,
            max_L=config["hidden_irreps"].lmax,
            default_dtype=dtype,
        )
    except Exception as exc:  # an architecture mace-torch's transfer does not know
        raise FoundationError(
            f"foundation.elements: cannot restrict {info.source} to the data's elements "
            f"({type(exc).__name__}: {exc}); set foundation.elements: all"
        ) from None
    model.eval()
    return model


def check_elements(info: FoundationInfo, atomic_numbers: set[int], where: str) -> None:
    """Refuse data with elements the foundation has never seen, naming them."""
    missing = sorted(atomic_numbers - set(info.atomic_numbers))
    if missing:
        names = ", ".join(chemical_symbols[z] for z in missing)
        raise FoundationError(
            f"{where}: elements {names} are not covered by the foundation {info.source} "
            f"(it knows {', '.join(info.elements)}); remove those configurations or pick a "
            "foundation that covers them"
        )


def model_file(model_or_run: Path) -> Path:
    """The file a model-or-run argument stands for: a run folder stands for its multi-head export."""
    if not model_or_run.is_dir():
        return model_or_run
    path = RunFolder(model_or_run).multihead
    if not path.is_file():
        raise DataError(
            f"{model_or_run}: no models/multihead.model (not a finished mace_mf run, or one with "
            "export.multihead off or a fidelity-conditioned backbone); pass models/<fidelity>.model"
        )
    return path


def load_model_file(model_or_run: Path, dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, FoundationInfo]:
    """Any MACE model file (or a run folder's multi-head model), in ``dtype``, with its description."""
    return load_foundation(str(model_file(model_or_run)), None, dtype, any_head=True)
