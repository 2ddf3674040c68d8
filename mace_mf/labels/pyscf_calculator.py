"""PySCF as an ASE calculator: the quantum-chemistry levels of the seed regime, for ``mace-mf label``.

Spec ``pyscf:<method>/<basis>`` (``--calculator pyscf:pbe0/def2-svp``, ``pyscf:mp2/cc-pvtz``,
``pyscf:ccsd(t)/cc-pvdz``). The method is ``hf``, ``mp2``, ``ccsd``, ``ccsd(t)``, or any
exchange-correlation functional PySCF's libxc interface knows (``pbe``, ``pbe0``, ``b3lyp``,
``wb97x``, ...). The basis is any name PySCF's basis library knows.

- Forces are analytic gradients for HF, DFT and MP2. CCSD and CCSD(T) have energies only: label
  them with ``--energies-only`` (asking for their forces is an error, not a finite difference).
- Charge and spin come from ``atoms.info`` exactly as for xTB (``charge``; ``multiplicity``, ``spin``
  or ``uhf``; default neutral, lowest spin): restricted references for singlets, unrestricted for
  open shells.
- Density fitting (``density_fit``) is on by default for HF/DFT (several times faster for hybrids,
  with analytic DF gradients) and off for the correlated methods, whose gradients PySCF has only
  without it. It is a property of the level, not of the run: an energies-only label and a label with
  forces of the same spec are the same level of theory.
- A fresh molecule and SCF per configuration (no guess carried over), so every label is independent
  of which worker made it and of the order. An SCF that does not converge is retried once with a
  second-order solver, then fails that configuration (the labelling run records it and goes on).

Keyword arguments (``--calc-kwargs``): ``density_fit``, ``conv_tol`` (Hartree, default 1e-10),
``grid_level`` (DFT grid, default 3), ``max_cycle`` (default 100), ``max_memory`` (MB, default 4000),
``frozen_core`` (correlated methods leave the 1s shells of C/N/O uncorrelated; default true).
This module imports PySCF only when a calculation runs, so a worker that labels with xTB never does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes

from mace_mf.labels.charge import charge_and_multiplicity

WAVEFUNCTION_METHODS = ("hf", "mp2", "ccsd", "ccsd(t)")
ENERGY_ONLY_METHODS = ("ccsd", "ccsd(t)")


def split_level(level: str) -> tuple[str, str]:
    """``"PBE0/def2-SVP"`` as (``"pbe0"``, ``"def2-svp"``); a ValueError names what is missing."""
    method, sep, basis = level.strip().partition("/")
    if not sep or not method.strip() or not basis.strip():
        raise ValueError(f"{level!r} is not <method>/<basis>, e.g. pbe0/def2-svp or mp2/cc-pvtz")
    return method.strip().lower(), basis.strip().lower()


def check_level(method: str, basis: str) -> None:
    """Fail at once (ValueError, one line) on a method or basis PySCF does not know."""
    from pyscf import gto
    from pyscf.dft import libxc

    if method not in WAVEFUNCTION_METHODS:
        try:
            libxc.parse_xc(method)
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"method {method!r} is neither one of {', '.join(WAVEFUNCTION_METHODS)} nor a functional "
                f"PySCF knows ({exc})"
            ) from None
    try:
        gto.M(atom="H 0 0 0; H 0 0 0.74", basis=basis, verbose=0)
    except Exception as exc:  # PySCF raises several types for an unknown basis name
        raise ValueError(f"basis {basis!r} is not in PySCF's basis library ({type(exc).__name__})") from None


class PySCF(Calculator):
    """Energy (and forces, where analytic gradients exist) of one level of theory."""

    implemented_properties = ("energy", "forces")

    def __init__(
        self,
        level: str,
        density_fit: bool | None = None,
        conv_tol: float = 1e-10,
        grid_level: int = 3,
        max_cycle: int = 100,
        max_memory: int = 4000,
        frozen_core: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.method, self.basis = split_level(level)
        correlated = self.method in ("mp2", "ccsd", "ccsd(t)")
        self.density_fit = (not correlated) if density_fit is None else bool(density_fit)
        if correlated and self.density_fit and self.method != "mp2":
            raise ValueError(f"density_fit is not available for {self.method}; leave it unset")
        self.conv_tol = conv_tol
        self.grid_level = grid_level
        self.max_cycle = max_cycle
        self.max_memory = max_memory
        self.frozen_core = frozen_core

    def calculate(
        self, atoms: Atoms | None = None, properties: tuple[str, ...] = ("energy",), system_changes=all_changes
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        want_forces = "forces" in properties
        if want_forces and self.method in ENERGY_ONLY_METHODS:
            raise ValueError(f"{self.method} has no analytic gradient in PySCF; label it with --energies-only")
        if want_forces and self.method == "mp2" and self.density_fit:
            raise ValueError("density-fitted MP2 has no gradient in PySCF; use density_fit: false for forces")
        energy_ha, gradient = self._run(self.atoms, want_forces)
        self.results["energy"] = energy_ha * units.Hartree
        if gradient is not None:
            self.results["forces"] = -np.asarray(gradient) * units.Hartree / units.Bohr

    def _molecule(self, atoms: Atoms) -> Any:
        from pyscf import gto

        charge, multiplicity = charge_and_multiplicity(atoms)
        return gto.M(
            atom=[
                (s, tuple(float(x) for x in p))
                for s, p in zip(atoms.get_chemical_symbols(), atoms.positions, strict=True)
            ],
            basis=self.basis,
            unit="Angstrom",
            charge=charge,
            spin=multiplicity - 1,
            max_memory=self.max_memory,
            verbose=0,
        )

    def _scf(self, mol: Any) -> Any:
        from pyscf import dft, scf

        restricted = mol.spin == 0
        if self.method in WAVEFUNCTION_METHODS:
            mf = scf.RHF(mol) if restricted else scf.UHF(mol)
        else:
            mf = dft.RKS(mol, xc=self.method) if restricted else dft.UKS(mol, xc=self.method)
            mf.grids.level = self.grid_level
        if self.density_fit:
            mf = mf.density_fit()
        mf.conv_tol = self.conv_tol
        mf.max_cycle = self.max_cycle
        mf.kernel()
        if not mf.converged:
            mf = mf.newton()
            mf.kernel()
        if not mf.converged:
            raise RuntimeError(f"SCF did not converge in {self.max_cycle} cycles, nor with a second-order solver")
        return mf

    def _frozen_core(self, mol: Any) -> int | None:
        """Core orbitals left uncorrelated (1s of C, N, O), as correlated reference data usually are."""
        from pyscf.data.elements import chemcore

        count = int(chemcore(mol)) if self.frozen_core else 0
        return count or None

    def _run(self, atoms: Atoms, want_forces: bool) -> tuple[float, np.ndarray | None]:
        mf = self._scf(self._molecule(atoms))
        frozen = self._frozen_core(mf.mol)
        if self.method == "mp2":
            from pyscf import mp

            post = mp.MP2(mf, frozen=frozen)  # density-fitted when the SCF is
            post.kernel()
            return float(post.e_tot), (post.nuc_grad_method().kernel() if want_forces else None)
        if self.method in ("ccsd", "ccsd(t)"):
            from pyscf import cc

            post = cc.CCSD(mf, frozen=frozen)
            post.conv_tol = self.conv_tol
            post.kernel()
            if not post.converged:
                raise RuntimeError("CCSD amplitudes did not converge")
            energy = float(post.e_tot)
            if self.method == "ccsd(t)":
                energy += float(post.ccsd_t())
            return energy, None
        return float(mf.e_tot), (mf.nuc_grad_method().kernel() if want_forces else None)
