"""Turning a foundation into a multi-fidelity model, and reading every head from one backbone pass.

The trained model is a stock ``mace.modules.ScaleShiftMACE`` whose ``heads`` are the recipe's
fidelities, so the multi-head export is the model itself and stock ``MACECalculator`` loads it.

Readout layout (mace-torch 0.3.16, the same layout its own fine-tuning uses): a
``LinearReadoutBlock`` maps features to ``H x 0e`` (one column per head); a
``NonLinearReadoutBlock`` maps to ``H*K`` hidden scalars laid out head-major, masks the other heads'
hidden units, then maps to ``H x 0e``. e3nn normalises a linear layer by ``1/sqrt(fan_in)``, so the
second layer's weights scale by ``sqrt(H)`` when ``H`` heads share its input. :func:`extract_head`
and :func:`replicate_head` are the two directions of that one mapping; every head starts as an exact
copy of the foundation's readout, so before training every head gives the foundation's forces.

Stock ``forward`` evaluates one head per graph. :func:`fidelity_energies` runs the backbone once
and reads any subset of heads from the same node features, which is what makes an extra fidelity
nearly free (a readout and its gradient, not another backbone pass).
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
from mace.modules.utils import prepare_graph
from mace.tools.scatter import scatter_sum

from mace_mf.errors import FoundationError

SUPPORTED_READOUTS = (LinearReadoutBlock, NonLinearReadoutBlock)


def head_names(model: torch.nn.Module) -> list[str]:
    """The model's heads; a model without a ``heads`` attribute has one head, ``Default``."""
    return list(getattr(model, "heads", None) or ["Default"])


def _hidden_per_head(readout: NonLinearReadoutBlock, num_heads: int) -> int:
    return int(readout.linear_1.irreps_out.num_irreps) // num_heads


def _with_heads(
    model: ScaleShiftMACE, heads: list[str], atomic_energies: np.ndarray, scale: np.ndarray, shift: np.ndarray
) -> tuple[ScaleShiftMACE, list[torch.nn.Module]]:
    """A copy of ``model`` with fresh readouts sized for ``heads`` (weights to be filled in).

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
        for readout in readouts:
            if isinstance(readout, LinearReadoutBlock):
                block = LinearReadoutBlock(readout.linear.irreps_in, o3.Irreps(f"{num}x0e"))
            else:
                k = _hidden_per_head(readout, len(head_names(model)))
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
    """A single-head copy of ``model`` that computes exactly what ``head`` computes."""
    _check_readouts(model)
    names = head_names(model)
    h, num = names.index(head), len(names)
    energies, scale, shift = _head_buffers(model)
    single, fresh = _with_heads(model, [head], energies[h : h + 1], scale[h : h + 1], shift[h : h + 1])
    for readout, target in zip(model.readouts, fresh, strict=True):
        if isinstance(readout, LinearReadoutBlock):
            target.linear.weight.copy_(readout.linear.weight.view(-1, num)[:, h])
        else:
            k = _hidden_per_head(readout, num)
            w1 = readout.linear_1.weight.view(-1, num * k)[:, h * k : (h + 1) * k]
            w2 = readout.linear_2.weight.view(num * k, num)[h * k : (h + 1) * k, h]
            target.linear_1.weight.copy_(w1.reshape(-1))
            target.linear_2.weight.copy_(w2 / math.sqrt(num))
    return single


@torch.no_grad()
def replicate_head(single: ScaleShiftMACE, heads: list[str]) -> ScaleShiftMACE:
    """A model with ``heads``, each an exact copy of ``single``'s only head."""
    _check_readouts(single)
    if len(head_names(single)) != 1:
        raise ValueError("replicate_head needs a single-head model; use extract_head first")
    num = len(heads)
    energies, scale, shift = _head_buffers(single)
    multi, fresh = _with_heads(
        single, heads, np.repeat(energies, num, axis=0), np.repeat(scale, num), np.repeat(shift, num)
    )
    for readout, target in zip(single.readouts, fresh, strict=True):
        if isinstance(readout, LinearReadoutBlock):
            target.linear.weight.copy_(readout.linear.weight.view(-1, 1).repeat(1, num).reshape(-1))
        else:
            k = _hidden_per_head(readout, 1)
            target.linear_1.weight.copy_(readout.linear_1.weight.view(-1, k).repeat(1, num).reshape(-1))
            w2 = readout.linear_2.weight.view(k, 1).repeat(num, num) * math.sqrt(num)
            target.linear_2.weight.copy_(w2.reshape(-1))
    return multi


def build_fidelity_model(foundation: ScaleShiftMACE, start_head: str, fidelities: Sequence[str]) -> ScaleShiftMACE:
    """One head per fidelity, each initialised from the foundation's ``start_head``."""
    return replicate_head(extract_head(foundation, start_head), list(fidelities))


def set_head_e0s(model: ScaleShiftMACE, head: int, e0s: np.ndarray) -> None:
    """Overwrite one head's atomic reference energies (ordered as ``model.atomic_numbers``)."""
    buffer = model.atomic_energies_fn.atomic_energies
    values = torch.as_tensor(e0s, dtype=buffer.dtype, device=buffer.device)
    if buffer.dim() == 1:
        buffer.copy_(values)
    else:
        buffer[head].copy_(values)


def node_features(model: ScaleShiftMACE, data: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The backbone pass: node features of every interaction layer, plus pair energies.

    Mirrors ``ScaleShiftMACE.forward`` of mace-torch 0.3.16 up to the readouts, so that the
    readouts can be applied once per head on the same features.
    """
    ctx = prepare_graph(data)
    node_attrs = data["node_attrs"]
    feats = model.node_embedding(node_attrs)
    edge_attrs = model.spherical_harmonics(ctx.vectors)
    edge_feats, cutoff = model.radial_embedding(ctx.lengths, node_attrs, data["edge_index"], model.atomic_numbers)
    if hasattr(model, "pair_repulsion"):
        pair = model.pair_repulsion_fn(ctx.lengths, node_attrs, data["edge_index"], model.atomic_numbers)
    else:
        pair = torch.zeros(node_attrs.shape[0], dtype=ctx.vectors.dtype, device=node_attrs.device)
    layers: list[torch.Tensor] = []
    for i, (interaction, product) in enumerate(zip(model.interactions, model.products, strict=True)):
        feats, sc = interaction(
            node_attrs=node_attrs,
            node_feats=feats,
            edge_attrs=edge_attrs,
            edge_feats=edge_feats,
            edge_index=data["edge_index"],
            cutoff=cutoff,
            first_layer=(i == 0),
            lammps_class=None,
            lammps_natoms=(0, 0),
        )
        feats = product(node_feats=feats, sc=sc, node_attrs=node_attrs)
        layers.append(feats)
    return layers, pair


def fidelity_energies(model: ScaleShiftMACE, data: dict[str, torch.Tensor], heads: Sequence[int]) -> torch.Tensor:
    """Total energies ``[n_graphs, len(heads)]`` of the requested heads from one backbone pass.

    ``data['positions']`` has ``requires_grad`` set on return, so forces of head ``j`` are
    ``-dE[:, j]/dpositions``.
    """
    layers, pair = node_features(model, data)
    batch = data["batch"]
    num_graphs = int(data["ptr"].numel() - 1)
    arange = torch.arange(batch.shape[0], device=batch.device)
    e0_nodes = model.atomic_energies_fn(data["node_attrs"])  # [n_nodes, n_heads]
    scale = torch.atleast_1d(model.scale_shift.scale)
    shift = torch.atleast_1d(model.scale_shift.shift)
    columns = []
    for h in heads:
        node_heads = torch.full_like(batch, h)
        node_es = pair
        for i, readout in enumerate(model.readouts):
            feats = layers[-1 if len(model.readouts) == 1 else i]
            node_es = node_es + readout(feats, node_heads)[arange, node_heads]
        node_es = scale[h] * node_es + shift[h] + e0_nodes[:, h].to(node_es.dtype)
        columns.append(scatter_sum(node_es, batch, dim=0, dim_size=num_graphs))
    return torch.stack(columns, dim=1)


def fidelity_forces(
    energies: torch.Tensor, positions: torch.Tensor, columns: Sequence[int], create_graph: bool
) -> list[torch.Tensor]:
    """Forces ``-dE/dr`` for the given energy columns (one gradient call per column)."""
    forces = []
    for n, j in enumerate(columns):
        (grad,) = torch.autograd.grad(
            energies[:, j].sum(),
            positions,
            create_graph=create_graph,
            retain_graph=create_graph or n < len(columns) - 1,
        )
        forces.append(-grad)
    return forces


def fit_e0s(counts: np.ndarray, residuals: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Least-squares atomic reference energies: ``base + δ`` with ``counts @ δ ≈ residuals``.

    ``residuals`` are label − foundation prediction. The minimum-norm solution leaves elements
    absent from the data (and directions the compositions cannot resolve) at ``base``.
    """
    delta, *_ = np.linalg.lstsq(counts, residuals, rcond=None)
    return base + delta
