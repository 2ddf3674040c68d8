"""Which ASE calculator labels a configuration: the ``--calculator`` spec, and one labelling call.

A spec is a short string a user can type and a recipe can hold:

- ``gfn2-xtb``, ``gfn1-xtb``, ``ipea1-xtb``: tblite's xTB methods. Charge and spin are read per
  configuration from ``atoms.info`` (see :func:`charge_and_multiplicity`), never guessed from
  ASE's initial charges or magnetic moments, which extxyz files rarely carry on purpose;
- ``mace:PATH[:head]``: pseudo-labels of a MACE file through stock ``MACECalculator``;
- ``pyscf:<method>/<basis>``: HF, DFT, MP2 or CCSD(T) with PySCF (mace_mf.labels.pyscf_calculator),
  built fresh for every configuration like xTB;
- ``module.path:ClassName``: any ASE calculator, built with the ``kwargs`` of the spec.

This module is what labelling worker processes import, so it stays light at import time (no
torch, no mace): a spawned worker that labels with tblite starts in well under a second.
The xTB calculator is built fresh for every configuration, because tblite reuses the previous
wavefunction as the SCF guess: a fresh one makes each label independent of which worker labelled
which configuration before it, so results are bit-identical whatever the worker count or a resume.
"""

from __future__ import annotations

import importlib
import json
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.calculators.calculator import Calculator

from mace_mf.errors import LabelError
from mace_mf.files import file_sha256
from mace_mf.labels.charge import charge_and_multiplicity
from mace_mf.quiet import silence_known_noise

TBLITE_METHODS = {"gfn2-xtb": "GFN2-xTB", "gfn1-xtb": "GFN1-xTB", "ipea1-xtb": "IPEA1-xTB"}
IMPORT_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SPEC_HELP = "use gfn2-xtb, gfn1-xtb, pyscf:<method>/<basis>, mace:PATH[:head] or module.path:ClassName"


@dataclass(frozen=True)
class CalculatorSpec:
    """A parsed ``--calculator`` value: picklable, so worker processes rebuild the calculator."""

    text: str
    kind: str  # "tblite", "pyscf", "mace" or "import"
    target: str  # tblite method name, pyscf method/basis, model path, or module:Class
    head: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What determines the labels: keys a cache of results is valid for.

        A MACE file is identified by its content, so a retrained model at the same path is not
        mistaken for the old one.
        """
        ident: dict[str, Any] = {"calculator": self.text, "kwargs": self.kwargs}
        if self.kind == "mace":
            ident["model_sha256"] = file_sha256(Path(self.target))
        return ident

    def __str__(self) -> str:
        if not self.kwargs:
            return self.text
        return f"{self.text} {json.dumps(self.kwargs, sort_keys=True, default=str)}"


def parse_calc_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``--calc-kwargs`` values: JSON objects and/or ``key=value`` pairs (values parsed as YAML)."""
    result: dict[str, Any] = {}
    for item in items or []:
        text = item.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                example = '{"accuracy": 0.1}'
                raise LabelError(f"--calc-kwargs {item!r}: not valid JSON ({exc.msg}); e.g. '{example}'") from None
            if not isinstance(value, dict):
                raise LabelError(f"--calc-kwargs {item!r}: expected a JSON object")
            result.update(value)
            continue
        if "=" not in text:
            raise LabelError(f"--calc-kwargs {item!r}: expected key=value or a JSON object, e.g. accuracy=0.1")
        key, raw = text.split("=", 1)
        try:
            result[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise LabelError(f"--calc-kwargs {item!r}: the value is not valid YAML; quote it") from None
    return result


def parse_calculator_spec(text: str, kwargs: dict[str, Any] | None = None) -> CalculatorSpec:
    """Validate a spec string (files must exist, names must be known); one-line errors otherwise."""
    kwargs = dict(kwargs or {})
    name = text.strip()
    if name.lower() in TBLITE_METHODS:
        return CalculatorSpec(name.lower(), "tblite", TBLITE_METHODS[name.lower()], None, kwargs)
    if name.lower().startswith("pyscf:"):
        from mace_mf.labels.pyscf_calculator import split_level

        try:
            method, basis = split_level(name[len("pyscf:") :])
        except ValueError as exc:
            raise LabelError(f"--calculator {text!r}: {exc}") from None
        return CalculatorSpec(f"pyscf:{method}/{basis}", "pyscf", f"{method}/{basis}", None, kwargs)
    if name.startswith("mace:"):
        rest = name[len("mace:") :]
        path, head = rest, None
        if ":" in rest and Path(rest.rsplit(":", 1)[0]).is_file():
            path, head = rest.rsplit(":", 1)
        if not Path(path).is_file():
            raise LabelError(f"--calculator {text!r}: model file {path} not found; use mace:PATH[:head]")
        return CalculatorSpec(f"mace:{path}" + (f":{head}" if head else ""), "mace", path, head or None, kwargs)
    if IMPORT_PATTERN.match(name):
        return CalculatorSpec(name, "import", name, None, kwargs)
    raise LabelError(f"--calculator {text!r}: unknown calculator; {SPEC_HELP}")


def tblite_calculator(method: str, atoms: Atoms | None = None, **kwargs: Any) -> Calculator:
    """A fresh, quiet tblite calculator; charge and multiplicity from ``atoms.info`` when given.

    The one place in the project that builds tblite calculators (the demo data script uses it
    too), so every xTB label is made the same way.
    """
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise LabelError("tblite is not installed; pip install tblite (or mace-mf[xtb])") from None
    parameters: dict[str, Any] = {"verbosity": 0, **kwargs}
    if atoms is not None:
        charge, multiplicity = charge_and_multiplicity(atoms, kwargs)
        parameters.update(charge=charge, multiplicity=multiplicity)
    return TBLite(method=TBLITE_METHODS.get(method.lower(), method), **parameters)


# Calculators that are expensive to build (a MACE model, a user's class) live once per process.
_CACHED: dict[str, Calculator] = {}


def _import_class(target: str) -> type:
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        reason = f"cannot import {module_name} ({exc})"
        raise LabelError(f"--calculator {target!r}: {reason}; check the module path") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise LabelError(f"--calculator {target!r}: {module_name} has no class {class_name}")
    return cls


def build_calculator(spec: CalculatorSpec) -> Calculator:
    """The calculator of a MACE or import-path spec (one per process; see :func:`calculator_for`)."""
    if spec.kind == "mace":
        import mace  # noqa: F401  (before e3nn)
        from mace.calculators import MACECalculator

        options = {"device": "cpu", "default_dtype": "float64", **spec.kwargs}
        calc = MACECalculator(model_paths=spec.target, head=spec.head, **options)
        if spec.head is not None and spec.head not in calc.available_heads:
            # Stock MACECalculator silently falls back to the last head; a wrong name is an error here.
            raise LabelError(f"--calculator {spec.text}: no head {spec.head!r} (heads: {calc.available_heads})")
        return calc
    cls = _import_class(spec.target)
    try:
        return cls(**spec.kwargs)
    except TypeError as exc:
        raise LabelError(f"--calculator {spec.text}: {exc}; check --calc-kwargs") from None


def pyscf_calculator(spec: CalculatorSpec) -> Calculator:
    """A fresh PySCF calculator of the spec's level (cheap: the work is in each calculation)."""
    from mace_mf.labels.pyscf_calculator import PySCF

    try:
        return PySCF(spec.target, **spec.kwargs)
    except (TypeError, ValueError) as exc:
        raise LabelError(f"--calculator {spec.text}: {exc}; check --calc-kwargs") from None


def calculator_for(spec: CalculatorSpec, atoms: Atoms) -> Calculator:
    """The calculator that labels ``atoms``: fresh for xTB and PySCF, reused (and reset) otherwise."""
    if spec.kind == "tblite":
        return tblite_calculator(spec.target, atoms, **spec.kwargs)
    if spec.kind == "pyscf":
        return pyscf_calculator(spec)
    calc = _CACHED.get(str(spec))
    if calc is None:
        calc = _CACHED[str(spec)] = build_calculator(spec)
    calc.reset()
    return calc


def check_calculator(spec: CalculatorSpec, forces: bool = True) -> None:
    """Fail early, with one line, on a spec that cannot label anything (missing package, bad kwargs,
    an unknown method or basis, forces asked of an energy-only method)."""
    if spec.kind == "pyscf":
        try:
            from mace_mf.labels.pyscf_calculator import ENERGY_ONLY_METHODS, check_level
        except ImportError:
            raise LabelError("pyscf is not installed; pip install pyscf (or mace-mf[dft])") from None
        calc = pyscf_calculator(spec)
        try:
            check_level(calc.method, calc.basis)
        except ValueError as exc:
            raise LabelError(f"--calculator {spec.text}: {exc}") from None
        if forces and (calc.method in ENERGY_ONLY_METHODS or (calc.method == "mp2" and calc.density_fit)):
            raise LabelError(f"--calculator {spec.text}: no analytic forces in PySCF; label with --energies-only")
        return
    if spec.kind == "tblite":
        probe = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
        try:
            tblite_calculator(spec.target, probe, **spec.kwargs)
        except TypeError as exc:
            raise LabelError(f"--calculator {spec.text}: {exc}; check --calc-kwargs") from None
        return
    _CACHED[str(spec)] = build_calculator(spec)


def compute(spec: CalculatorSpec, atoms: Atoms, forces: bool = True) -> tuple[float, np.ndarray | None]:
    """Energy (eV) and, when asked, forces (eV/Å) of one configuration; raises on failure or
    non-finite results. Energies only skip the gradient (most of the cost of a correlated method)."""
    work = atoms.copy()
    work.calc = calculator_for(spec, atoms)
    energy = float(np.asarray(work.get_potential_energy()).reshape(()))
    if not np.isfinite(energy):
        raise ValueError("non-finite energy")
    if not forces:
        return energy, None
    values = np.array(work.get_forces(), dtype=float)
    if values.shape != (len(atoms), 3):
        raise ValueError(f"forces of shape {values.shape}, expected ({len(atoms)}, 3)")
    if not np.isfinite(values).all():
        raise ValueError("non-finite forces")
    return energy, values


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# ---- run in labelling worker processes (spawned; see mace_mf.labels.labelling) ----


def init_worker(kind: str) -> None:
    """One thread per worker: OMP_NUM_THREADS=1 in the environment covers tblite, BLAS and a
    torch that a user calculator imports; MACE workers also set torch's count explicitly.
    Importing torch only where needed keeps an xTB or ASE worker's start well under a second.
    Ctrl-C is left to the parent, which stops submitting, keeps the finished results and exits;
    a worker killed by it would look like a crash and be retried."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    silence_known_noise()
    if kind == "mace":
        import torch

        torch.set_num_threads(1)


def label_chunk(spec: CalculatorSpec, items: list[tuple[int, Atoms]], forces: bool = True) -> list[dict[str, Any]]:
    """Label a few configurations; a failure is a result with a reason, never an exception."""
    results: list[dict[str, Any]] = []
    for index, atoms in items:
        try:
            energy, values = compute(spec, atoms, forces)
        except Exception as exc:  # any calculator error is this configuration's failure
            results.append({"index": index, "error": one_line(exc)})
            continue
        record: dict[str, Any] = {"index": index, "energy": energy}
        if values is not None:
            record["forces"] = values.tolist()
        results.append(record)
    return results
