"""Labelling a file of configurations with an ASE calculator (``mace-mf label``), resumably.

The paper's recipe needs cheap low-level *forces* on the geometries that carry expensive
high-level *energies*; this module makes them. Every configuration is sent to a pool of spawned
worker processes (one thread each: parallelism comes from processes), and every result is appended
to a sidecar cache, ``OUTPUT.partial.jsonl``, flushed as it arrives. The cache's first line names
the input (content hash), the calculator and the keys, so a killed run continues exactly where it
stopped (``--resume``) and never mixes results of another input or calculator. Only when every
configuration has been tried is the output written, atomically, and the cache removed.

A configuration whose calculation fails (SCF not converged, atoms too close, a worker that
crashes) is recorded with a one-line reason in ``OUTPUT.failures.tsv`` and written to the output
without the new labels: masked in training, never faked. A resume retries failed configurations.

Existing labels are kept: the new ones go under ``<fidelity>_energy`` (``atoms.info``) and
``<fidelity>_forces`` (``atoms.arrays``), and a file that already holds them is refused unless
``overwrite_labels``. Recipes use the same engine through :func:`label_recipe_data`, with a cache
keyed by the input's content and the calculator, so a second training run reuses the labels.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ase.io
import numpy as np
from ase import Atoms

from mace_mf.errors import LabelError
from mace_mf.files import atomic_write_text, atomic_write_xyz, file_sha256
from mace_mf.labels.calculators import (
    CalculatorSpec,
    check_calculator,
    init_worker,
    label_chunk,
    one_line,
    parse_calculator_spec,
)

if TYPE_CHECKING:
    from mace_mf.config.schema import Recipe

log = logging.getLogger(__name__)

CACHE_VERSION = 1
PARTIAL_SUFFIX = ".partial.jsonl"
FAILURES_SUFFIX = ".failures.tsv"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class LabelReport:
    """What a labelling run did: counts, failures (index, reason), wall time, files."""

    output: Path
    total: int
    labelled: int
    reused: int
    failures: list[tuple[int, str]] = field(default_factory=list)
    wall_s: float = 0.0
    failures_file: Path | None = None

    def summary(self) -> str:
        computed = self.labelled + len(self.failures) - self.reused
        rate = f", {1000 * self.wall_s / computed:.1f} ms per configuration" if computed > 0 else ""
        failed = f", {len(self.failures)} failed (see {self.failures_file})" if self.failures else ", none failed"
        reused = f" ({self.reused} from an earlier run)" if self.reused else ""
        return f"{self.output}: {self.labelled}/{self.total} labelled{reused}{failed}; {self.wall_s:.1f} s{rate}"


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def failures_path(output: Path) -> Path:
    return output.with_name(output.name + FAILURES_SUFFIX)


# ---- parent side ----


@contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Spawned workers read these before loading OpenMP/BLAS, so each stays on one thread."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: "1" for name in THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_pool(
    spec: CalculatorSpec,
    frames: list[Atoms],
    pending: list[int],
    workers: int,
    chunk_size: int,
    on_result: Callable[[dict[str, Any]], None],
    forces: bool = True,
) -> None:
    """Label ``pending`` in a process pool; a crashed worker costs only its own configuration.

    When a worker dies (a segfault in a Fortran library, the OOM killer), the pool is rebuilt and
    the unfinished configurations are retried one at a time, first on all workers, then on one:
    with a single worker and one task in flight, the configuration that kills it is known and is
    recorded as failed while the rest go on.
    """
    levels = [(chunk_size, workers), (1, workers), (1, 1)]
    level = 0 if chunk_size > 1 else 1 if workers > 1 else 2
    queue = list(pending)
    context = mp.get_context("spawn")
    while queue:
        size, procs = levels[level]
        in_flight_limit = 1 if level == 2 else 2 * procs
        chunks = iter([queue[i : i + size] for i in range(0, len(queue), size)])
        finished: set[int] = set()
        try:
            pool_options = {"mp_context": context, "initializer": init_worker, "initargs": (spec.kind,)}
            with _single_threaded_children(), cf.ProcessPoolExecutor(procs, **pool_options) as pool:
                running: set[cf.Future] = set()
                exhausted = False
                while running or not exhausted:
                    while not exhausted and len(running) < in_flight_limit:
                        chunk = next(chunks, None)
                        if chunk is None:
                            exhausted = True
                            break
                        items = [(i, _bare(frames[i])) for i in chunk]
                        running.add(pool.submit(label_chunk, spec, items, forces))
                    done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for future in done:
                        for result in future.result():
                            on_result(result)
                            finished.add(result["index"])
        except BrokenProcessPool:
            remaining = [i for i in queue if i not in finished]
            if level == 2:
                culprit, remaining = remaining[0], remaining[1:]
                on_result({"index": culprit, "error": "the worker process died while labelling it (calculator crash)"})
            else:
                level = 1 if level == 0 else 2
            log.warning("a labelling worker died; retrying %d configuration(s) one at a time", len(remaining))
            queue = remaining
            continue
        queue = []


def _bare(atoms: Atoms) -> Atoms:
    """The configuration as the calculator sees it: geometry, info (charge, spin), no old results."""
    bare = atoms.copy()
    bare.calc = None
    return bare


def _has_labels(atoms: Atoms, energy_key: str | None, forces_key: str | None) -> str | None:
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    if energy_key is not None and (energy_key in atoms.info or energy_key in results):
        return energy_key
    if forces_key is not None and (forces_key in atoms.arrays or forces_key in results):
        return forces_key
    return None


def _read_partial(path: Path, header: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Results of an interrupted run, after checking they belong to this input and calculator.

    A line torn by a kill (no trailing newline) is cut off, so appending continues cleanly.
    """
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    lines = data[:end].decode().splitlines()
    try:
        saved = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        saved = None
    if saved != json.loads(json.dumps(header)):
        what = "is unreadable" if saved is None else _header_difference(saved, header)
        raise LabelError(f"{path}: {what}; delete it to start over, or resume with the same input and calculator")
    results: dict[int, dict[str, Any]] = {}
    for line in lines[1:]:
        record = json.loads(line)
        if "error" not in record:
            results[int(record["index"])] = record
    return results


def _header_difference(saved: dict[str, Any], header: dict[str, Any]) -> str:
    for key in header:
        if saved.get(key) != header[key]:
            return f"holds results for a different {key.replace('_', ' ')} ({saved.get(key)!r})"
    return "holds results of another labelling run"


def label_frames(
    frames: list[Atoms],
    spec: CalculatorSpec,
    output: Path,
    header: dict[str, Any],
    workers: int = 1,
    resume: bool = False,
    chunk_size: int = 1,
    progress: bool = True,
    forces: bool = True,
) -> tuple[dict[int, dict[str, Any]], dict[int, str], int]:
    """Label every configuration, streaming results to the sidecar cache; return results, failures, reused.

    ``forces=False`` computes energies only (no gradient: most of a correlated method's cost)."""
    partial = partial_path(output)
    results: dict[int, dict[str, Any]] = {}
    check_calculator(spec, forces)  # before any file exists: a refused spec leaves nothing behind
    if partial.is_file():
        if not resume:
            raise LabelError(
                f"{partial}: results of an interrupted run; pass --resume to continue it, or delete the file"
            )
        results = _read_partial(partial, header)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(header) + "\n")
    reused = len(results)
    pending = [i for i in range(len(frames)) if i not in results]
    failures: dict[int, str] = {}
    if not pending:
        return results, failures, reused
    with open(partial, "a") as cache, _progress(len(frames), reused, str(spec), progress) as advance:
        last_sync = time.monotonic()

        def on_result(record: dict[str, Any]) -> None:
            nonlocal last_sync
            cache.write(json.dumps(record) + "\n")
            cache.flush()  # a killed run keeps everything up to the last finished configuration
            if time.monotonic() - last_sync > 1.0:
                os.fsync(cache.fileno())
                last_sync = time.monotonic()
            if "error" in record:
                failures[record["index"]] = record["error"]
            else:
                results[record["index"]] = record
            advance(len(failures))

        _run_pool(spec, frames, pending, workers, chunk_size, on_result, forces)
        os.fsync(cache.fileno())
    return results, failures, reused


@contextmanager
def _progress(total: int, done: int, what: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda failed: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]label[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(what, total=total, completed=done, failed=0)
        yield lambda failed: bar.update(task, advance=1, failed=failed)


def label_file(
    input_path: str | Path,
    output: str | Path,
    spec: CalculatorSpec,
    energy_key: str | None,
    forces_key: str | None,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    overwrite_labels: bool = False,
    fmt: str | None = None,
    chunk_size: int = 1,
    progress: bool = True,
) -> LabelReport:
    """Label every configuration of ``input_path`` into ``output`` (extxyz), keeping existing labels."""
    started = time.perf_counter()
    source, output = Path(input_path), Path(output)
    if workers < 1 or chunk_size < 1:
        raise LabelError("--workers and --chunk-size must be at least 1")
    if energy_key is None and forces_key is None:
        raise LabelError("nothing to write: give an energy key, a forces key, or both")
    if output.exists() and not overwrite:
        raise LabelError(f"{output}: already exists; pass --overwrite to replace it, or choose another OUTPUT")
    frames = _read(source, fmt)
    if not overwrite_labels:
        for i, atoms in enumerate(frames):
            present = _has_labels(atoms, energy_key, forces_key)
            if present is not None:
                raise LabelError(
                    f"{source}: configuration {i} already has {present!r}; pass --overwrite-labels to replace "
                    "these labels, or choose another --fidelity"
                )
    header = {
        "version": CACHE_VERSION,
        "input_sha256": file_sha256(source),
        "configurations": len(frames),
        **spec.identity(),
        "energy_key": energy_key,
        "forces_key": forces_key,
    }
    results, failures, reused = label_frames(
        frames, spec, output, header, workers, resume, chunk_size, progress, forces=forces_key is not None
    )
    for i, atoms in enumerate(frames):
        _drop_labels(atoms, energy_key, forces_key)
        record = results.get(i)
        if record is None:
            continue
        if energy_key is not None:
            atoms.info[energy_key] = float(record["energy"])
        if forces_key is not None:
            atoms.arrays[forces_key] = np.asarray(record["forces"], dtype=float).reshape(len(atoms), 3)
    atomic_write_xyz(output, frames)
    failed = sorted(failures.items())
    failures_file = failures_path(output)
    if failed:
        lines = ["index\treason", *(f"{i}\t{reason}" for i, reason in failed)]
        atomic_write_text(failures_file, "\n".join(lines) + "\n")
    else:
        failures_file.unlink(missing_ok=True)
    partial_path(output).unlink(missing_ok=True)
    report = LabelReport(
        output, len(frames), len(results), reused, failed, time.perf_counter() - started, failures_file
    )
    if not results:
        first = failed[0][1] if failed else "no configurations"
        raise LabelError(f"{source}: no configuration could be labelled with {spec} (first failure: {first})")
    return report


def _drop_labels(atoms: Atoms, energy_key: str | None, forces_key: str | None) -> None:
    """Remove labels about to be replaced, so a failed configuration keeps no stale ones."""
    if energy_key is not None:
        atoms.info.pop(energy_key, None)
    if forces_key is not None and forces_key in atoms.arrays:
        del atoms.arrays[forces_key]


def _read(path: Path, fmt: str | None) -> list[Atoms]:
    if not path.is_file():
        raise LabelError(f"{path}: input file not found")
    try:
        frames = ase.io.read(path, index=":", format=fmt)
    except Exception as exc:  # ASE raises many types for a bad file; all mean "cannot parse"
        what = fmt or "a guessed ASE format"
        raise LabelError(f"{path}: cannot read as {what} ({one_line(exc)}); set --format") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise LabelError(f"{path}: no configurations in the file")
    return frames


# ---- recipes: label on the fly, cached by content ----

SPLITS = ("train", "valid", "test")


def cached_label(
    source: Path,
    spec: CalculatorSpec,
    energy_key: str | None,
    forces_key: str | None,
    cache_dir: Path,
    tag: str,
    workers: int,
    overwrite_labels: bool,
    fmt: str | None,
) -> LabelReport:
    """Labels of ``source`` from the cache, computing (or finishing) them when absent.

    The file name holds a hash of the input's content, the calculator (and a MACE file's content)
    and the keys, so an edited data file or another calculator never reuses stale labels.
    """
    ident = {
        "input_sha256": file_sha256(source),
        **spec.identity(),
        "energy_key": energy_key,
        "forces_key": forces_key,
        "overwrite_labels": overwrite_labels,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    output = cache_dir / f"{source.stem}.{tag}-{key}.xyz"
    if output.is_file():
        failures_file = failures_path(output)
        failed: list[tuple[int, str]] = []
        if failures_file.is_file():
            for line in failures_file.read_text().splitlines()[1:]:
                index, reason = line.split("\t", 1)
                failed.append((int(index), reason))
        total = len(ase.io.read(output, index=":", format="extxyz"))
        return LabelReport(output, total, total - len(failed), total - len(failed), failed, 0.0, failures_file)
    return label_file(
        source,
        output,
        spec,
        energy_key,
        forces_key,
        workers=workers,
        resume=True,
        overwrite_labels=overwrite_labels,
        fmt=fmt,
    )


def label_recipe_data(recipe: Recipe, cache_dir: Path) -> tuple[Recipe, dict[str, dict[str, list[str]]]]:
    """A copy of ``recipe`` whose data files carry the labels its ``fidelities.*.labels`` declare.

    Files are labelled in declaration order (a second labelled fidelity labels the first one's
    output); one log line per labelled fidelity says what was computed or reused. Returns the
    copy and, per fidelity and split, the labelled files used (recorded in run.json).
    """
    labelled = {name: spec for name, spec in recipe.fidelities.items() if spec.labels is not None}
    if not labelled:
        return recipe, {}
    data_recipe = recipe.model_copy(deep=True)
    used: dict[str, dict[str, list[str]]] = {name: {} for name in labelled}
    stats = {name: {"configs": 0, "computed": 0, "failed": 0, "wall": 0.0, "failures": []} for name in labelled}
    relabelled_all = True
    for split in SPLITS:
        paths = getattr(recipe.data, split)
        if paths is None:
            continue
        new_paths = []
        for path in [paths] if isinstance(paths, str) else paths:
            current, fmt = Path(path), recipe.data.format
            for name, fidelity in labelled.items():
                labels = fidelity.labels
                assert labels is not None
                if split not in labels.splits:
                    continue
                spec = parse_calculator_spec(resolve_label_calculator(recipe, labels.calculator), labels.kwargs)
                report = cached_label(
                    current,
                    spec,
                    fidelity.energy_key,
                    fidelity.forces_key,
                    cache_dir,
                    name,
                    labels.workers,
                    labels.overwrite,
                    fmt,
                )
                current, fmt = report.output, None
                used[name].setdefault(split, []).append(str(current))
                entry = stats[name]
                entry["configs"] += report.total
                entry["computed"] += report.total - report.reused
                entry["failed"] += len(report.failures)
                entry["wall"] += report.wall_s
                if report.failures:
                    entry["failures"].append(str(report.failures_file))
            relabelled_all = relabelled_all and fmt is None
            new_paths.append(str(current))
        setattr(data_recipe.data, split, new_paths if isinstance(paths, list) else new_paths[0])
    if relabelled_all:
        data_recipe.data.format = None  # every file is now a cached extxyz
    for name, entry in stats.items():
        calculator = labelled[name].labels.calculator  # type: ignore[union-attr]
        failed = f", {entry['failed']} failed (see {', '.join(entry['failures'])})" if entry["failed"] else ""
        log.info(
            "labels %s (%s): %d configurations, %d computed in %.1f s, %d reused from %s%s",
            name,
            calculator,
            entry["configs"],
            entry["computed"],
            entry["wall"],
            entry["configs"] - entry["computed"],
            cache_dir,
            failed,
        )
    return data_recipe, used


def resolve_label_calculator(recipe: Recipe, calculator: str) -> str:
    """``foundation`` names the recipe's own foundation file: pseudo-labels of the model being tuned."""
    if calculator != "foundation":
        return calculator
    model = Path(recipe.foundation.model)
    if not model.is_file():
        raise LabelError(
            f"labels.calculator 'foundation' needs a local foundation.model file, not {recipe.foundation.model!r}"
        )
    return f"mace:{model}" + (f":{recipe.foundation.head}" if recipe.foundation.head else "")
