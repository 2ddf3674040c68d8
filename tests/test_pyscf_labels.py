"""`mace-mf label --calculator pyscf:...`: PySCF's own numbers, forces that are −∇E, energies only."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule

from mace_mf.cli import main
from mace_mf.labels.calculators import parse_calculator_spec
from mace_mf.labels.labelling import label_file

pytest.importorskip("pyscf")


def small_molecules() -> list[Atoms]:
    frames = []
    for i, name in enumerate(("H2O", "NH3", "CH3")):  # CH3: a radical, unrestricted
        atoms = molecule(name)
        atoms.set_initial_magnetic_moments(None)
        atoms.rattle(0.04, seed=i)
        frames.append(atoms)
    return frames


def pyscf_directly(atoms: Atoms) -> tuple[float, np.ndarray]:
    """HF/STO-3G as PySCF's documentation builds it (density-fitted, as the spec's default)."""
    from pyscf import gto, scf

    spin = int(atoms.numbers.sum()) % 2
    mol = gto.M(
        atom=list(zip(atoms.get_chemical_symbols(), atoms.positions.tolist(), strict=True)),
        basis="sto-3g",
        spin=spin,
        verbose=0,
    )
    mf = (scf.RHF(mol) if spin == 0 else scf.UHF(mol)).density_fit()
    mf.conv_tol = 1e-10
    energy = mf.kernel()
    gradient = mf.nuc_grad_method().kernel()
    return energy * units.Hartree, -gradient * units.Hartree / units.Bohr


def test_labels_equal_pyscf_called_directly_with_charge_and_spin_from_atoms_info(tmp_path):
    frames = small_molecules()
    ase.io.write(tmp_path / "in.xyz", frames)
    spec = parse_calculator_spec("pyscf:HF/STO-3G")
    assert spec.text == "pyscf:hf/sto-3g"
    report = label_file(tmp_path / "in.xyz", tmp_path / "out.xyz", spec, "hf_energy", "hf_forces", progress=False)
    assert (report.labelled, report.failures) == (3, [])
    for atoms, ref in zip(ase.io.read(tmp_path / "out.xyz", ":"), frames, strict=True):
        energy, forces = pyscf_directly(ref)
        assert atoms.info["hf_energy"] == pytest.approx(energy, abs=1e-7)
        np.testing.assert_allclose(atoms.arrays["hf_forces"], forces, atol=1e-6)
    # a charged configuration is labelled with its charge (and, unasked, the doublet it needs)
    cation = frames[0].copy()
    cation.info["charge"] = 1
    ase.io.write(tmp_path / "ion.xyz", [cation])
    label_file(tmp_path / "ion.xyz", tmp_path / "ion_out.xyz", spec, "hf_energy", None, progress=False)
    ionisation = ase.io.read(tmp_path / "ion_out.xyz").info["hf_energy"] - pyscf_directly(frames[0])[0]
    assert 5.0 < ionisation < 14.0  # ΔSCF at HF/STO-3G: 8.0 eV (12.6 eV measured); neutral would be 0


@pytest.mark.parametrize("level", ["mp2/sto-3g", "pbe0/sto-3g"])
def test_forces_are_central_differences_of_the_energy(level):
    from mace_mf.labels.pyscf_calculator import PySCF

    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=1)
    atoms.calc = PySCF(level)
    forces = atoms.get_forces()
    h = 1e-3
    for index, axis in ((1, 2), (4, 0)):
        shifted = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[index, axis] += sign * h
            moved.calc = PySCF(level)
            shifted.append(moved.get_potential_energy())
        # DFT gradients leave out the grid's response: a few 1e-4 eV/Å, far below any model error
        assert forces[index, axis] == pytest.approx(-(shifted[0] - shifted[1]) / (2 * h), abs=5e-4)


def test_energies_only_skips_forces_and_ccsd_t_must_ask_for_it(tmp_path, capsys):
    ase.io.write(tmp_path / "in.xyz", small_molecules()[:2])
    args = ["label", str(tmp_path / "in.xyz"), str(tmp_path / "out.xyz"), "--fidelity", "cc"]
    assert main([*args, "--calculator", "pyscf:ccsd(t)/sto-3g"]) == 2
    message = capsys.readouterr().err
    assert "pyscf:ccsd(t)/sto-3g" in message and "--energies-only" in message
    assert main([*args, "--calculator", "pyscf:ccsd(t)/sto-3g", "--energies-only"]) == 0
    written = ase.io.read(tmp_path / "out.xyz", ":")
    assert all("cc_energy" in a.info and "cc_forces" not in a.arrays for a in written)
    from pyscf import cc, gto, scf

    water = written[0]
    mol = gto.M(
        atom=list(zip(water.get_chemical_symbols(), water.positions.tolist(), strict=True)), basis="sto-3g", verbose=0
    )
    mf = scf.RHF(mol)
    mf.conv_tol = 1e-10
    mf.kernel()
    ccsd = cc.CCSD(mf, frozen=1)
    ccsd.conv_tol = 1e-10
    ccsd.kernel()
    assert water.info["cc_energy"] == pytest.approx((ccsd.e_tot + ccsd.ccsd_t()) * units.Hartree, abs=1e-6)


@pytest.mark.parametrize(
    "calculator,words",
    [
        ("pyscf:pbe0", "is not <method>/<basis>"),
        ("pyscf:nonsense/sto-3g", "method 'nonsense'"),
        ("pyscf:hf/no-such-basis", "basis 'no-such-basis'"),
    ],
)
def test_an_unknown_level_is_one_line_naming_it(tmp_path, capsys, calculator, words):
    ase.io.write(tmp_path / "in.xyz", small_molecules()[:1])
    code = main(
        ["label", str(tmp_path / "in.xyz"), str(tmp_path / "o.xyz"), "--fidelity", "x", "--calculator", calculator]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("o.xyz*"))  # no output, no partial cache
