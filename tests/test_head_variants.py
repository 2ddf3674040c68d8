"""Every way a head can be built passes the same physics and export checks, in both precisions.

The model comes from the one builder (``mace_mf.model.build``) as a run makes it, for each head
variant a recipe can ask for: independent heads, ``tied`` heads, a ``delta`` head (a correction of
its base, folded into one stock readout on export) and a fidelity-conditioned backbone (folded into
the embedding of each single-head export). Its weights are then moved off their start, as training
would, so that a head that silently falls back to another cannot pass. Checks (tests/physics.py):
invariances and forces = −∇E of mace_mf's shared-backbone forward, and every exported file (single
head, and the multi-head file where it exists) read by stock ``MACECalculator`` equals the head in
memory.
"""

from __future__ import annotations

import pytest
import torch
from physics import (
    HeadForward,
    StockCalculator,
    check_gradient,
    check_permutation,
    check_rigid_motion,
    check_same,
    rattled,
)
from support import ROOT, build_tiny_mace

from mace_mf.config.loading import recipe_from_dict
from mace_mf.model.build import build_model, torch_dtype
from mace_mf.model.export import export_models, read_metadata
from mace_mf.model.heads import EMBEDDING_PARAMETER, readout_weights

VARIANTS = {
    "independent": {"hi": {"base": None}},
    "tied": {"hi": {"coupling": "tied"}},
    "delta": {"hi": {"coupling": "delta"}},
    "embedding": {},
}
# (relative energy, absolute force in eV/Å). Measured for these molecules, every variant: float64 agrees
# to 7e-16 and 4e-16 eV/Å, float32 to 1.6e-7 and 4e-7 eV/Å (the precision's own rounding).
TOLERANCE = {"float64": (1e-12, 1e-12), "float32": (1e-6, 1e-5)}
STRUCTURES = [("CH3OH", 1), ("CH3CHO", 2), ("HCOOH", 3)]


def variant_model(variant: str, dtype: str) -> torch.nn.Module:
    fidelities = {
        "lo": {"energy_key": "lo_energy", "forces_key": "lo_forces", "forces_weight": 10.0},
        "hi": {"energy_key": "hi_energy", "forces_weight": 0.0, **VARIANTS[variant].get("hi", {})},
    }
    tree = {
        "foundation": {"model": "unused.model"},
        "fidelities": fidelities,
        "data": {"train": "unused.xyz"},
        "dtype": dtype,
        "training": {"fidelity_embedding": variant == "embedding"},
    }
    recipe = recipe_from_dict(tree, "variant", ROOT)
    model = build_model(build_tiny_mace(), recipe).to(torch_dtype(dtype))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # as after training: heads (and the embedding) moved off their start
        for h in (0, 1):
            for weight in readout_weights(model, h):
                weight.add_(0.3 * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))
        embedding = getattr(model, EMBEDDING_PARAMETER, None)
        if embedding is not None:
            embedding.add_(0.5 * torch.randn(embedding.shape, generator=generator, dtype=embedding.dtype))
        energies = model.atomic_energies_fn.atomic_energies
        energies.add_(torch.randn(energies.shape, generator=generator, dtype=energies.dtype))
    return model


@pytest.fixture(scope="module", params=[(v, d) for d in ("float64", "float32") for v in VARIANTS], ids="-".join)
def exported(request, tmp_path_factory):
    variant, dtype = request.param
    model = variant_model(variant, dtype)
    folder = tmp_path_factory.mktemp(f"{variant}-{dtype}")
    metadata = {"target": "hi", "variant": variant}
    export_models(model, ["lo", "hi"], folder, multihead=True, torchscript=False, metadata=metadata)
    return variant, dtype, model, folder


def test_heads_differ(exported):
    """A variant whose heads coincide would let every check below pass vacuously."""
    _, _, model, _ = exported
    atoms = rattled("CH3OH", 1)
    (e_lo, f_lo), (e_hi, f_hi) = HeadForward(model, "lo")(atoms), HeadForward(model, "hi")(atoms)
    assert abs(e_lo - e_hi) > 1e-3 and abs(f_lo - f_hi).max() > 1e-3


def test_invariances_and_forces_are_the_energy_gradient(exported):
    _, dtype, model, _ = exported
    forward = HeadForward(model, "hi")
    # float32: energies of ~4000 eV round to ~5e-4 eV, and the summation order of a moved molecule differs
    atol_e, atol_f = (1e-9, 1e-9) if dtype == "float64" else (5e-3, 1e-4)
    check_rigid_motion(forward, rattled("CH3OH", 1), atol_e=atol_e, atol_f=atol_f)
    check_permutation(forward, rattled("CH3CHO", 3), atol_e=atol_e, atol_f=atol_f)
    if dtype == "float64":  # a float32 finite difference measures rounding, not the gradient
        check_gradient(forward, rattled("HCOOH", 5), step=1e-4, atol=1e-6)


def test_every_exported_file_reproduces_the_head_in_memory(exported):
    variant, dtype, model, folder = exported
    rtol_e, atol_f = TOLERANCE[dtype]
    structures = [rattled(name, seed) for name, seed in STRUCTURES]
    for head in ("lo", "hi"):
        stock = StockCalculator(folder / f"{head}.model", dtype)
        check_same(HeadForward(model, head), stock, structures, rtol_e, atol_f)
    multihead = folder / "multihead.model"
    assert multihead.is_file() == (variant != "embedding")  # a conditioned backbone has no shared one
    if multihead.is_file():
        for head in ("lo", "hi"):
            stock = StockCalculator(multihead, dtype, head=head)
            check_same(HeadForward(model, head), stock, structures, rtol_e, atol_f)


def test_exported_files_carry_their_metadata(exported):
    variant, _, _, folder = exported
    single = torch.load(folder / "hi.model", weights_only=False)
    metadata = read_metadata(single)
    assert metadata["variant"] == variant and metadata["heads"] == ["hi"]
    assert metadata["mace_mf"] and metadata["mace_torch"] and metadata["torch"] == torch.__version__
