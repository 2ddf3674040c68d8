"""Readout surgery: one head per fidelity made from a foundation's readout, and back again.

The trained model is a stock ``mace.modules.ScaleShiftMACE`` whose ``heads`` are the recipe's
fidelities, so the multi-head export is the model itself and stock ``MACECalculator`` loads it.

Readout layout (mace-torch 0.3.16, the same layout its own fine-tuning uses): a
``LinearReadoutBlock`` maps features to ``H x 0e`` (one column per head); a
``NonLinearReadoutBlock`` maps to ``H*K`` hidden scalars laid out head-major, masks the other heads'
hidden units, then maps to ``H x 0e``. e3nn normalises a linear layer by ``1/sqrt(fan_in)``, so the
second layer's weights scale by ``sqrt(H)`` when ``H`` heads share its input. :func:`extract_head`
and :func:`replicate_head` are the two directions of that one mapping; every head starts as an exact
copy of the foundation's readout, so before training every head gives the foundation's forces.

Reading the heads is :mod:`mace_mf.model.forward`; assembling a recipe's model is
:mod:`mace_mf.model.build`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import mace  # noqa: F401  (before e3nn: mace relaxes torch.load for e3nn's constants)
import numpy as np
import torch
from e3nn import o3
from mace.modules.blocks import LinearReadoutBlock, NonLinearReadoutBlock
from mace.modules.models import ScaleShiftMACE

from mace_mf.errors import FoundationError
from mace_mf.quiet import torchscript_quiet

SUPPORTED_READOUTS = (LinearReadoutBlock, NonLinearReadoutBlock)
# Attribute of a training model listing, per head, the head it corrects (``delta`` coupling).
# Exported files never carry it: :func:`extract_head` folds each chain into one stock readout.
DELTA_ATTRIBUTE = "mf_delta_bases"
# Parameter ``[n_heads, n_scalar_channels]`` of a fidelity-conditioned backbone: each head's vector
# is added to the node embedding, so heads differ inside the network (SevenNet-MF style). One-hot
# element inputs make it foldable into the embedding weights of a single-head export.
EMBEDDING_PARAMETER = "mf_fidelity_embedding"


def head_names(model: torch.nn.Module) -> list[str]:
    """The model's heads; a model without a ``heads`` attribute has one head, ``Default``."""
    return list(getattr(model, "heads", None) or ["Default"])


def _hidden_per_head(readout: NonLinearReadoutBlock, num_heads: int) -> int:
    return int(readout.linear_1.irreps_out.num_irreps) // num_heads


def _with_heads(
    model: ScaleShiftMACE,
    heads: list[str],
    atomic_energies: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    hidden: int | None = None,
) -> tuple[ScaleShiftMACE, list[torch.nn.Module]]:
    """A copy of ``model`` with fresh readouts sized for ``heads`` (weights to be filled in).

    ``hidden``: MLP hidden units per head (default: the model's); a folded ``delta`` chain needs
    one block of hidden units per head of the chain.

    Only the readouts and head buffers change, so the backbone is deep-copied rather than rebuilt:
    constructing a MACE runs e3nn's code generation and costs seconds to tens of seconds.
    """
    readouts = model.readouts
    model.readouts = torch.nn.ModuleList()  # not copied: replaced below
    try:
        copy_ = copy.deepcopy(model)
    finally:
        model.readouts = readouts
    dtype = next(model.parameters()).dtype
    num = len(heads)
    fresh: list[torch.nn.Module] = []
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torchscript_quiet():  # e3nn scripts each new layer
            for readout in readouts:
                if isinstance(readout, LinearReadoutBlock):
                    block = LinearReadoutBlock(readout.linear.irreps_in, o3.Irreps(f"{num}x0e"))
                else:
                    k = hidden or _hidden_per_head(readout, len(head_names(model)))
                    block = NonLinearReadoutBlock(
                        readout.linear_1.irreps_in,
                        o3.Irreps(f"{num * k}x0e"),
                        readout.non_linearity.acts[0].f,
                        o3.Irreps(f"{num}x0e"),
                        num,
                    )
                fresh.append(block.to(dtype))
    finally:
        torch.set_default_dtype(previous)
    copy_.readouts = torch.nn.ModuleList(fresh)
    device = next(model.parameters()).device
    copy_.atomic_energies_fn.atomic_energies = torch.as_tensor(atomic_energies, dtype=dtype, device=device)
    copy_.scale_shift.scale = torch.as_tensor(scale, dtype=dtype, device=device)
    copy_.scale_shift.shift = torch.as_tensor(shift, dtype=dtype, device=device)
    copy_.heads = list(heads)
    if hasattr(copy_, DELTA_ATTRIBUTE):  # the new readouts are independent heads
        delattr(copy_, DELTA_ATTRIBUTE)
    copy_._parameters.pop(EMBEDDING_PARAMETER, None)  # folded into the embedding by extract_head
    return copy_.to(device), fresh


def _check_readouts(model: ScaleShiftMACE) -> None:
    for readout in model.readouts:
        if type(readout) not in SUPPORTED_READOUTS:
            raise FoundationError(
                f"foundation: readout {type(readout).__name__} is not supported; "
                "supported: LinearReadoutBlock, NonLinearReadoutBlock"
            )


def _head_buffers(model: ScaleShiftMACE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    energies = torch.atleast_2d(model.atomic_energies_fn.atomic_energies).detach().cpu().numpy()
    scale = torch.atleast_1d(model.scale_shift.scale).detach().cpu().numpy()
    shift = torch.atleast_1d(model.scale_shift.shift).detach().cpu().numpy()
    return energies, scale, shift


@torch.no_grad()
def extract_head(model: ScaleShiftMACE, head: str) -> ScaleShiftMACE:
    """A single-head copy of ``model`` that computes exactly what ``head`` computes.

    A ``delta`` head is folded with the heads it corrects into one stock readout: linear readout
    weights add, MLP hidden layers concatenate (``energy(base) + ΔE`` is then one MLP of twice the
    width), so the file needs nothing but mace-torch.
    """
    _check_readouts(model)
    names = head_names(model)
    h, num = names.index(head), len(names)
    chain = delta_chain(model, h)
    energies, scale, shift = _head_buffers(model)
    root = chain[-1]
    width = len(chain)
    mlp = [r for r in model.readouts if isinstance(r, NonLinearReadoutBlock)]
    single, fresh = _with_heads(
        model,
        [head],
        energies[h : h + 1],
        scale[root : root + 1],
        np.array([shift[chain].sum()]) if width > 1 else shift[h : h + 1],
        width * _hidden_per_head(mlp[0], num) if mlp else None,
    )
    embedding = getattr(model, EMBEDDING_PARAMETER, None)
    if embedding is not None:
        # One-hot inputs: x·W/sqrt(n_elements) + b == x·(W + sqrt(n_elements)·b)/sqrt(n_elements).
        linear = single.node_embedding.linear
        n_in = int(linear.irreps_in.dim)
        weight = linear.weight.view(n_in, -1)
        weight.add_(embedding[h].detach() * math.sqrt(n_in))
    # Every head of the chain is expressed in the root's scale (pair repulsion is scaled by it).
    ratios = [1.0 if j == root else float(scale[j] / scale[root]) for j in chain]
    for readout, target in zip(model.readouts, fresh, strict=True):
        if isinstance(readout, LinearReadoutBlock):
            w = readout.linear.weight.view(-1, num)
            target.linear.weight.copy_(sum(r * w[:, j] for r, j in zip(ratios, chain, strict=True)))
        else:
            k = _hidden_per_head(readout, num)
            w1 = readout.linear_1.weight.view(-1, num * k)
            w2 = readout.linear_2.weight.view(num * k, num)
            target.linear_1.weight.copy_(torch.cat([w1[:, j * k : (j + 1) * k] for j in chain], dim=1).reshape(-1))
            # e3nn divides by sqrt(fan_in): num·k inputs here, width·k in the single head.
            norm = math.sqrt(width / num)
            target.linear_2.weight.copy_(
                torch.cat([r * w2[j * k : (j + 1) * k, j] for r, j in zip(ratios, chain, strict=True)]) * norm
            )
    return single


def replicate_head(single: ScaleShiftMACE, heads: list[str]) -> ScaleShiftMACE:
    """A model with ``heads``, each an exact copy of ``single``'s only head."""
    return merge_heads([single] * len(heads), heads)


@torch.no_grad()
def merge_heads(singles: Sequence[ScaleShiftMACE], heads: list[str]) -> ScaleShiftMACE:
    """One multi-head model from single-head models that share a backbone (the inverse of
    :func:`extract_head`); MLP hidden blocks are zero-padded to the widest head."""
    for single in singles:
        _check_readouts(single)
        if len(head_names(single)) != 1:
            raise ValueError("merge_heads needs single-head models; use extract_head first")
    num = len(heads)
    buffers = [_head_buffers(s) for s in singles]
    energies = np.concatenate([b[0] for b in buffers], axis=0)
    scale = np.concatenate([b[1] for b in buffers])
    shift = np.concatenate([b[2] for b in buffers])
    per_readout = list(zip(*(s.readouts for s in singles), strict=True))
    widths = [max(_hidden_per_head(r, 1) for r in rs) for rs in per_readout if isinstance(rs[0], NonLinearReadoutBlock)]
    multi, fresh = _with_heads(singles[0], heads, energies, scale, shift, widths[0] if widths else None)
    for readouts, target in zip(per_readout, fresh, strict=True):
        if isinstance(target, LinearReadoutBlock):
            target.linear.weight.copy_(torch.stack([r.linear.weight for r in readouts], dim=1).reshape(-1))
            continue
        width = _hidden_per_head(target, num)
        w1 = target.linear_1.weight.view(-1, num * width)
        w2 = target.linear_2.weight.view(num * width, num)
        w1.zero_()
        w2.zero_()
        for h, readout in enumerate(readouts):
            k = _hidden_per_head(readout, 1)
            w1[:, h * width : h * width + k] = readout.linear_1.weight.view(-1, k)
            # e3nn divides by sqrt(fan_in): k inputs in the single head, num·width here.
            w2[h * width : h * width + k, h] = readout.linear_2.weight * math.sqrt(num * width / k)
    return multi


def set_head_e0s(model: ScaleShiftMACE, head: int, e0s: np.ndarray) -> None:
    """Overwrite one head's atomic reference energies (ordered as ``model.atomic_numbers``)."""
    buffer = model.atomic_energies_fn.atomic_energies
    values = torch.as_tensor(e0s, dtype=buffer.dtype, device=buffer.device)
    if buffer.dim() == 1:
        buffer.copy_(values)
    else:
        buffer[head].copy_(values)


def delta_bases(model: torch.nn.Module) -> list[int | None]:
    """Per head, the head it is a correction of (``delta`` coupling), or None."""
    bases = getattr(model, DELTA_ATTRIBUTE, None)
    return list(bases) if bases is not None else [None] * len(head_names(model))


def delta_chain(model: torch.nn.Module, head: int) -> list[int]:
    """``head`` followed by the heads it corrects, nearest first (``[head]`` when independent)."""
    bases = delta_bases(model)
    chain = [head]
    while (base := bases[chain[-1]]) is not None:
        chain.append(base)
    return chain


@torch.no_grad()
def make_delta_head(model: ScaleShiftMACE, head: int, base: int) -> None:
    """Turn ``head`` into a correction of ``base``: energy(head) = energy(base) + ΔE, ΔE = 0 at start.

    Only the output weights are zeroed (the linear readout and the MLP's second layer): the MLP's
    hidden layer keeps the foundation's weights, so ΔE has a gradient from the first step (zeroing
    both layers would leave it stuck at zero). The correction shares the base's scale and has no
    shift of its own; the head's E0s are refitted afterwards on label − base prediction.
    """
    names = head_names(model)
    num = len(names)
    for readout in model.readouts:
        if isinstance(readout, LinearReadoutBlock):
            readout.linear.weight.view(-1, num)[:, head] = 0.0
        else:
            k = _hidden_per_head(readout, num)
            readout.linear_2.weight.view(num * k, num)[head * k : (head + 1) * k, head] = 0.0
    model.scale_shift.scale[head] = model.scale_shift.scale[base]
    model.scale_shift.shift[head] = 0.0
    bases = delta_bases(model)
    bases[head] = base
    setattr(model, DELTA_ATTRIBUTE, bases)


def add_fidelity_embedding(model: ScaleShiftMACE) -> None:
    """Condition the backbone on the fidelity: a zero-initialised vector per head added to the
    node embedding (so training starts from the unconditioned model)."""
    width = int(model.node_embedding.linear.irreps_out.dim)
    weight = model.node_embedding.linear.weight
    model.register_parameter(
        EMBEDDING_PARAMETER,
        torch.nn.Parameter(torch.zeros(len(head_names(model)), width, dtype=weight.dtype, device=weight.device)),
    )


def readout_weights(model: ScaleShiftMACE, head: int, outputs_only: bool = False) -> list[torch.Tensor]:
    """Views of the readout weights that belong to ``head``: per readout its output weights and
    (MLP readouts, unless ``outputs_only``) its hidden layer. Head penalties act on these."""
    num = len(head_names(model))
    views: list[torch.Tensor] = []
    for readout in model.readouts:
        if isinstance(readout, LinearReadoutBlock):
            views.append(readout.linear.weight.view(-1, num)[:, head])
        else:
            k = _hidden_per_head(readout, num)
            views.append(readout.linear_2.weight.view(num * k, num)[head * k : (head + 1) * k, head])
            if not outputs_only:
                views.append(readout.linear_1.weight.view(-1, num * k)[:, head * k : (head + 1) * k])
    return views


def fit_e0s(counts: np.ndarray, residuals: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Least-squares atomic reference energies: ``base + δ`` with ``counts @ δ ≈ residuals``.

    ``residuals`` are label − foundation prediction. The minimum-norm solution leaves elements
    absent from the data (and directions the compositions cannot resolve) at ``base``.
    """
    delta, *_ = np.linalg.lstsq(counts, residuals, rcond=None)
    return base + delta
