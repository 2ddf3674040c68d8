"""Charge and spin of a configuration, read from ``atoms.info`` the same way by every calculator
(xTB, PySCF), never guessed from ASE's initial charges or magnetic moments."""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms

# atoms.info keys read by the xTB and PySCF methods (documented in the README and the recipe reference).
CHARGE_KEY = "charge"
MULTIPLICITY_KEYS = ("multiplicity", "spin")  # 2S+1; `spin` as MACE's calculator and fairchem read it
UHF_KEY = "uhf"  # number of unpaired electrons (2S), xtb's own convention


def electron_count(atoms: Atoms, charge: int) -> int:
    return int(atoms.numbers.sum()) - charge


def _integer(atoms: Atoms, key: str) -> int:
    value = atoms.info[key]
    number = float(np.asarray(value).reshape(()))
    if not number.is_integer():
        raise ValueError(f"atoms.info[{key!r}] = {value!r} is not an integer")
    return int(number)


def charge_and_multiplicity(atoms: Atoms, defaults: dict[str, Any] | None = None) -> tuple[int, int]:
    """Total charge and spin multiplicity (2S+1) of one configuration, from ``atoms.info``.

    Keys: ``charge`` (default 0); ``multiplicity`` or ``spin`` (both 2S+1, the convention of
    MACE's calculator and of fairchem) or ``uhf`` (unpaired electrons). Several keys must agree.
    Without any, the lowest multiplicity for the electron count: singlet, or doublet for an odd
    count (a radical), rather than an unphysical fractional occupation. ``defaults`` (the
    calculator kwargs ``charge``/``multiplicity``) apply to configurations lacking the keys.
    """
    defaults = defaults or {}
    charge = _integer(atoms, CHARGE_KEY) if CHARGE_KEY in atoms.info else int(defaults.get("charge") or 0)
    electrons = electron_count(atoms, charge)
    if electrons < 0:
        raise ValueError(f"charge {charge} leaves {electrons} electrons")
    given = {key: _integer(atoms, key) for key in MULTIPLICITY_KEYS if key in atoms.info}
    if UHF_KEY in atoms.info:
        given[UHF_KEY] = _integer(atoms, UHF_KEY) + 1
    if len(set(given.values())) > 1:
        raise ValueError(f"atoms.info spin keys disagree ({given}; multiplicity = spin = uhf + 1)")
    if given:
        multiplicity = next(iter(given.values()))
    elif defaults.get("multiplicity") is not None:
        multiplicity = int(defaults["multiplicity"])
    else:
        multiplicity = 1 + electrons % 2
    if multiplicity < 1 or (multiplicity - 1) % 2 != electrons % 2 or multiplicity - 1 > electrons:
        raise ValueError(f"multiplicity {multiplicity} impossible with {electrons} electrons (charge {charge})")
    return charge, multiplicity
