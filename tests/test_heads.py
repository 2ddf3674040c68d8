"""Heads start as the foundation and the shared-backbone forward equals stock MACE per head (the physics
of every head variant: tests/test_head_variants.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase.build import molecule
from mace.calculators import MACECalculator
from mace.tools import AtomicNumberTable
from support import SHARED, build_tiny_mace, fidelity_model

from mace_mf.data.graphs import batch_dict, to_graph
from mace_mf.data.read import Labels
from mace_mf.model.forward import fidelity_energies, fidelity_forces
from mace_mf.model.foundation import load_foundation
from mace_mf.model.heads import extract_head, fit_e0s, head_names
from mace_mf.train.loss import Weights, multi_fidelity_loss

FIDELITIES = ["lo", "mid", "hi"]


def graph_of(atoms, model):
    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    n_heads = len(getattr(model, "heads", ["Default"]))
    labels = Labels([None] * n_heads, [None] * n_heads)
    return to_graph(
        atoms, labels, z_table, float(model.r_max), list(getattr(model, "heads", ["Default"])), torch.float64
    )


def energies_and_forces(model, atoms, heads):
    from mace.tools.torch_geometric import Batch

    data = batch_dict(Batch.from_data_list([graph_of(atoms, model)]))
    energies = fidelity_energies(model, data, heads)
    forces = fidelity_forces(energies, data["positions"], list(range(len(heads))), create_graph=False)
    return energies.detach()[0].numpy(), [f.detach().numpy() for f in forces]


def perturbed(model, seed=1):
    """Make heads differ, as after training, so head routing errors cannot hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.readouts.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.atomic_energies_fn.atomic_energies.add_(torch.randn_like(model.atomic_energies_fn.atomic_energies))
    return model


SHARED_MODELS = [
    "spice_small_2022.model",
    "spice_small_2022_original.model",
    "water_delta_r2scan_ccsdt.model",
    "gesbte_swa.model",
]


def structure_for(model):
    zs = [int(z) for z in model.atomic_numbers]
    if 32 in zs:
        from ase.build import bulk

        atoms = bulk("Ge", "diamond", 5.6) * (2, 1, 1)
        atoms.symbols[1], atoms.symbols[2] = "Te", "Sb"
    elif zs == [1, 8]:
        atoms = molecule("H2O")
    else:
        atoms = molecule("CH3CHO")
    atoms.rattle(0.05, seed=3)
    return atoms


def load_named_foundation(name):
    if name == "tiny":
        return build_tiny_mace()
    path = SHARED / "models" / name
    if not path.is_file():
        pytest.skip(f"{path} is not present on this machine (pretrained models live in ../shared)")
    return load_foundation(str(path), None, torch.float64)[0]


@pytest.mark.parametrize("name", ["tiny", *SHARED_MODELS])
def test_every_head_starts_as_the_foundation(name):
    foundation = load_named_foundation(name)
    atoms = structure_for(foundation)
    ref = MACECalculator(models=copy.deepcopy(foundation), device="cpu", default_dtype="float64")
    atoms.calc = ref
    e_ref, f_ref = atoms.get_potential_energy(), atoms.get_forces()
    start = head_names(foundation)[0]
    model = fidelity_model(foundation, FIDELITIES, start)
    energies, forces = energies_and_forces(model, atoms, [0, 1, 2])
    for h in range(3):
        assert energies[h] == pytest.approx(e_ref, abs=1e-8)
        np.testing.assert_allclose(forces[h], f_ref, atol=1e-10)
        stock = MACECalculator(models=copy.deepcopy(model), device="cpu", default_dtype="float64", head=FIDELITIES[h])
        atoms.calc = stock
        np.testing.assert_allclose(atoms.get_forces(), f_ref, atol=1e-10)


def test_shared_forward_equals_stock_forward_per_head():
    model = perturbed(fidelity_model(build_tiny_mace(), FIDELITIES))
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=2)
    energies, forces = energies_and_forces(model, atoms, [0, 1, 2])
    assert len({round(float(e), 6) for e in energies}) == 3, "perturbed heads must differ"
    for h, name in enumerate(FIDELITIES):
        calc = MACECalculator(models=copy.deepcopy(model), device="cpu", default_dtype="float64", head=name)
        atoms.calc = calc
        assert energies[h] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(forces[h], atoms.get_forces(), atol=1e-9)


def test_extracted_single_head_reproduces_its_head():
    model = perturbed(fidelity_model(build_tiny_mace(), FIDELITIES))
    atoms = molecule("C2H6")
    atoms.rattle(0.05, seed=4)
    energies, forces = energies_and_forces(model, atoms, [0, 1, 2])
    for h, name in enumerate(FIDELITIES):
        single = extract_head(model, name)
        assert single.heads == [name]
        e, f = energies_and_forces(single, atoms, [0])
        assert e[0] == pytest.approx(energies[h], abs=1e-9)
        np.testing.assert_allclose(f[0], forces[h], atol=1e-10)


def test_fit_e0s_recovers_known_offsets_and_keeps_absent_elements():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 6, size=(40, 4)).astype(float)
    counts[:, 3] = 0.0  # element 3 never appears
    true = np.array([-0.5, -37.0, -54.0, 0.0])
    base = np.array([-13.0, -1000.0, -1400.0, -2000.0])
    e0 = fit_e0s(counts, counts @ true, base)
    np.testing.assert_allclose(e0, base + true, atol=1e-8)
    assert e0[3] == base[3]


def test_a_fidelity_without_force_labels_gets_no_force_gradient():
    """Masking: forces of a head whose labels are absent contribute exactly zero gradient."""
    from mace.tools.torch_geometric import Batch

    model = fidelity_model(build_tiny_mace(), ["a", "b"])
    z_table = AtomicNumberTable([1, 6, 7, 8])
    atoms = molecule("CH4")
    atoms.rattle(0.05, seed=8)
    labels = Labels([-100.0, None], [np.ones((5, 3)), None])
    data = batch_dict(Batch.from_data_list([to_graph(atoms, labels, z_table, 4.0, ["a", "b"], torch.float64)]))
    energies = fidelity_energies(model, data, [0, 1])
    forces = dict(zip([0, 1], fidelity_forces(energies, data["positions"], [0, 1], create_graph=True), strict=True))
    loss, terms = multi_fidelity_loss(energies, forces, data, Weights((1.0, 1.0), (1.0, 1.0)))
    assert float(terms["f1"]) == 0.0 and float(terms["e1"]) == 0.0
    loss.backward()
    readout_b = model.readouts[1].linear_2.weight.grad.view(-1, 2)[:, 1]
    assert torch.count_nonzero(model.readouts[1].linear_2.weight.grad.view(-1, 2)[:, 0]) > 0
    assert torch.count_nonzero(readout_b) == 0


def test_routed_forces_take_each_graphs_head_in_one_gradient_call():
    """A batch whose graphs need different heads' forces: each graph's forces are its heads', equal
    to one gradient call per head, from as many calls as the most heads one graph needs; the loss
    and its parameter gradients are the same either way."""
    from mace.tools.torch_geometric import Batch

    from mace_mf.model.forward import routed_forces

    model = perturbed(fidelity_model(build_tiny_mace(), FIDELITIES))
    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    graphs = []
    for i, (name, labelled) in enumerate([("CH4", (0,)), ("H2O", (2,)), ("NH3", (0, 2)), ("CH3OH", ())]):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=i)
        forces = [np.full((len(atoms), 3), 0.1 * (h + 1)) if h in labelled else None for h in range(3)]
        energies = [-10.0 * len(atoms) if h in labelled else None for h in range(3)]
        graphs.append(to_graph(atoms, Labels(energies, forces), z_table, 4.0, FIDELITIES, torch.float64))
    weights = Weights((1.0, 1.0, 1.0), (10.0, 0.0, 5.0))

    def loss_and_grads(routed: bool):
        model.zero_grad()
        data = batch_dict(Batch.from_data_list(graphs))
        energies = fidelity_energies(model, data, [0, 1, 2])
        if routed:
            need = weights.force_need(data["mf_forces_mask"])
            assert need.tolist() == [[True, False, False], [False, False, True], [True, False, True], [False] * 3]
            forces = routed_forces(energies, data["positions"], data["batch"], need, create_graph=True)
        else:
            plain = fidelity_forces(energies, data["positions"], [0, 2], create_graph=True)
            forces = dict(zip([0, 2], plain, strict=True))
        loss, _ = multi_fidelity_loss(energies, forces, data, weights)
        loss.backward()
        return forces, loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    routed, loss_routed, grads_routed = loss_and_grads(True)
    plain, loss_plain, grads_plain = loss_and_grads(False)
    node_graph = Batch.from_data_list(graphs).batch
    for h, graphs_needing in ((0, (0, 2)), (2, (1, 2))):
        nodes = torch.isin(node_graph, torch.tensor(graphs_needing))
        torch.testing.assert_close(routed[h][nodes], plain[h][nodes], rtol=0, atol=1e-12)
        assert torch.count_nonzero(routed[h][~nodes]) == 0  # not computed where no graph needs them
    assert float(loss_routed) == pytest.approx(float(loss_plain), rel=1e-12)
    for a, b in zip(grads_routed, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
