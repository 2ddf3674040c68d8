"""ASE calculators used by the labelling tests through ``--calculator label_calculators:Name``.

They are real calculators (tblite, a Morse potential) with one test-only behaviour each: slowness
(to kill a run midway), an exception, or a dying process on configurations marked in atoms.info.
"""

from __future__ import annotations

import os
import time

from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.morse import MorsePotential

from mace_mf.labels.calculators import tblite_calculator


class SlowGFN2(Calculator):
    """GFN2-xTB (exactly as ``--calculator gfn2-xtb``) that takes at least ``delay`` seconds."""

    implemented_properties = ("energy", "forces")

    def __init__(self, delay: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        time.sleep(self.delay)
        inner = tblite_calculator("gfn2-xtb", self.atoms)
        inner.calculate(self.atoms.copy(), ["energy", "forces"], all_changes)
        self.results = {"energy": inner.results["energy"], "forces": inner.results["forces"]}


class MarkedMorse(MorsePotential):
    """A Morse potential that fails on configurations with ``atoms.info['fail']``: raise or ``exit``."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        how = atoms.info.get("fail") if atoms is not None else None
        if how == "raise":
            raise RuntimeError("marked configuration refused")
        if how == "exit":
            os._exit(3)  # a crash that kills the worker process, as a segfault would
        super().calculate(atoms, properties, system_changes)
