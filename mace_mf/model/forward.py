"""The shared-backbone forward: every head read from one backbone pass.

Stock ``ScaleShiftMACE.forward`` evaluates one head per graph. :func:`fidelity_energies` runs the
backbone once (:func:`node_features`) and reads any subset of heads from the same node features,
which is what makes an extra fidelity nearly free (a readout and its gradient, not another backbone
pass). Training, evaluation, the E0 fit and the displacement pairs all go through it; the exported
files are checked against it (a head read here equals the stock forward of its exported file).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mace.modules.models import ScaleShiftMACE
from mace.modules.utils import prepare_graph
from mace.tools.scatter import scatter_sum

from mace_mf.model.heads import EMBEDDING_PARAMETER, delta_chain


def node_features(
    model: ScaleShiftMACE, data: dict[str, torch.Tensor], head: int | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The backbone pass: node features of every interaction layer, plus pair energies.

    Mirrors ``ScaleShiftMACE.forward`` of mace-torch 0.3.16 up to the readouts, so that the
    readouts can be applied once per head on the same features. With a fidelity-conditioned
    backbone, ``head`` selects whose embedding vector is added to the node embedding.
    """
    ctx = prepare_graph(data)
    node_attrs = data["node_attrs"]
    feats = model.node_embedding(node_attrs)
    embedding = getattr(model, EMBEDDING_PARAMETER, None)
    if embedding is not None and head is not None:
        feats = feats + embedding[head]
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

    A ``delta`` head adds the scaled readouts of every head in its chain (:func:`delta_chain`)
    to its own, with its own E0s; pair repulsion counts once. ``data['positions']`` has
    ``requires_grad`` set on return, so forces of head ``j`` are ``-dE[:, j]/dpositions``.
    """
    conditioned = getattr(model, EMBEDDING_PARAMETER, None) is not None
    passes = {h: node_features(model, data, h) for h in heads} if conditioned else {}
    shared = None if conditioned else node_features(model, data)
    batch = data["batch"]
    num_graphs = int(data["ptr"].numel() - 1)
    arange = torch.arange(batch.shape[0], device=batch.device)
    e0_nodes = model.atomic_energies_fn(data["node_attrs"])  # [n_nodes, n_heads]
    scale = torch.atleast_1d(model.scale_shift.scale)
    shift = torch.atleast_1d(model.scale_shift.shift)
    raw: dict[tuple[int, bool, int], torch.Tensor] = {}

    def scaled(h: int, root: bool, owner: int) -> torch.Tensor:
        # As stock ScaleShiftMACE: scale·(pair + readouts) + shift; pair only in the chain's root.
        # ``owner``: the head whose backbone pass the features come from.
        if (h, root, owner) not in raw:
            layers, pair = passes[owner] if conditioned else shared
            node_heads = torch.full_like(batch, h)
            node_es = pair if root else torch.zeros_like(pair)
            for i, readout in enumerate(model.readouts):
                feats = layers[-1 if len(model.readouts) == 1 else i]
                node_es = node_es + readout(feats, node_heads)[arange, node_heads]
            raw[(h, root, owner)] = scale[h] * node_es + shift[h]
        return raw[(h, root, owner)]

    columns = []
    for h in heads:
        chain = delta_chain(model, h)
        node_es = e0_nodes[:, h].to(scale.dtype)
        for n, j in enumerate(chain):
            node_es = node_es + scaled(j, n == len(chain) - 1, h if conditioned else 0)
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


def routed_forces(
    energies: torch.Tensor, positions: torch.Tensor, batch: torch.Tensor, need: torch.Tensor, create_graph: bool
) -> dict[int, torch.Tensor]:
    """Forces ``-dE/dr`` of head ``h`` on the graphs that need them (``need [n_graphs, H]``), as
    ``{h: [n_nodes, 3]}`` (zero on the nodes of graphs that do not).

    Graphs in a batch share no edges, so one gradient call can take each graph's forces of a
    different head: it takes as many calls as the most heads any one graph needs, not one per head.
    A batch that mixes geometries labelled at different fidelities (replay geometries riding along
    the fine-tuning data, each with its own level's forces) then costs one backward pass, not two.
    """
    remaining = need.clone()
    forces: dict[int, torch.Tensor] = {}
    while remaining.any():
        has = remaining.any(dim=1)
        pick = remaining.to(torch.int8).argmax(dim=1)  # each graph's first head still needed
        remaining[has, pick[has]] = False
        chosen = energies.gather(1, pick.unsqueeze(1)).squeeze(1) * has.to(energies.dtype)
        (grad,) = torch.autograd.grad(
            chosen.sum(), positions, create_graph=create_graph, retain_graph=create_graph or bool(remaining.any())
        )
        node_pick = torch.where(has, pick, -1)[batch]
        for h in pick[has].unique().tolist():
            part = -grad * (node_pick == h).unsqueeze(1).to(grad.dtype)
            forces[h] = forces[h] + part if h in forces else part
    return forces
