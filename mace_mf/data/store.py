"""The data store: configurations converted once into chunked HDF5 shards, read by index from disk.

Why a store: a run used to read every file with ASE into memory and build every graph in one
process, again for every run, bench arm, sweep trial and torchrun rank. A store is written once (in
parallel), and everything after reads only what it needs: a configuration by its index (what a
DataLoader worker turns into a graph), or one label column over every configuration (what the E0 fit
and the label tables read), never the whole data set at once.

Why HDF5 (h5py, already a dependency of mace-torch) rather than LMDB: the data are columns
(positions, numbers, one column per label key) of known length, which HDF5 stores as typed arrays
that can be sliced by index *and* read column by column, so a pass over one label of a million
geometries reads megabytes instead of decoding a million pickled records; files are self-describing
(``h5dump``, ``h5py``), portable, and open read-only in any number of processes. LMDB shines for
many concurrent writers and variable records, neither of which a store needs.

Layout of a store folder::

    manifest.json          written last, atomically: a folder without it is not a store
    plan.json              the sources (content hashes) and the chunk plan; kept for resume
    shard-NNNNN.h5         one chunk of configurations of one source, written by one process
    shard-NNNNN.json       that shard's summary (counts, elements, label keys), written after it
    skipped.tsv            configurations left out with ``--skip-bad`` (source, index, reason)

Each shard holds ``n_atoms`` [n], ``source_index`` [n] (the configuration's index in its source file),
``cell`` [n, 3, 3], ``pbc`` [n, 3], ``numbers`` [A] and ``positions`` [A, 3] (A atoms, configurations
consecutive), and every label the source carries: ``info/<key>`` [n, ...] with ``info_mask/<key>``
(present or not), ``arrays/<key>`` [A, ...] with ``arrays_mask/<key>``. Calculator results that ASE
attaches (extxyz ``energy``/``forces``) are stored under their own names, as if they were in
``atoms.info``/``atoms.arrays``. Every configuration is checked while it is converted (at least two
atoms, none closer than 0.1 Å, finite labels, one shape per per-atom label key); bad input stops the
conversion with the file and configuration named, or is skipped and listed with ``skip_bad``.

Sources: any file ASE reads (extxyz files are split by byte offset so several processes parse one
file), mace-torch's preprocessed HDF5 (``config_batch_*/config_*`` groups) and its LMDB data
(``.aselmdb``, read through mace-torch's own reader). A recipe or command that names a source instead
of a store gets a store cached under the source's content hash (:func:`open_data`), so the second
run of the same data converts nothing.

This module imports neither torch nor mace at module level: conversion workers start in well under
a second.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import hashlib
import io
import json
import logging
import mmap
import multiprocessing as mp
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ase.io
import h5py
import numpy as np
from ase import Atoms

from mace_mf.errors import DataError, RunError
from mace_mf.files import atomic_write_text, file_sha256
from mace_mf.version import __version__

log = logging.getLogger(__name__)

STORE_FORMAT = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
SKIPPED = "skipped.tsv"
CHUNK = 10_000  # configurations per shard: one worker's unit of work and of resume
MIN_DISTANCE = 0.1  # Å: closer atoms are a broken geometry, not chemistry
PER_ATOM_RESULTS = ("forces", "energies", "charges", "magmoms", "stresses")  # ASE results with a row per atom
CACHE_ENV = "MACE_MF_CACHE"


def _escape(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F")


def _unescape(name: str) -> str:
    return name.replace("%2F", "/").replace("%25", "%")


def check_geometry(atoms: Atoms, where: str) -> None:
    """Refuse geometries that no potential should be fitted to."""
    if len(atoms) < 2:
        raise DataError(f"{where}: a configuration with {len(atoms)} atom(s); isolated atoms are fixed by E0s, drop it")
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    np.fill_diagonal(distances, np.inf)
    closest = float(distances.min())
    if closest < MIN_DISTANCE:
        raise DataError(f"{where}: atoms {closest:.3f} Å apart (< {MIN_DISTANCE} Å); fix or drop the configuration")


# ---- sources -----------------------------------------------------------------------------------


def source_kind(path: Path, fmt: str | None) -> str:
    """``store``, ``mace-hdf5``, ``mace-lmdb``, ``extxyz`` (split by byte offsets) or ``ase`` (any other
    format ASE reads, converted in one process)."""
    if path.is_dir() and ((path / MANIFEST).is_file() or (path / PLAN).is_file()):
        return "store"
    if path.suffix in (".aselmdb", ".lmdb") or (path.is_dir() and any(path.glob("*.aselmdb"))):
        return "mace-lmdb"
    if path.suffix in (".h5", ".hdf5") and fmt is None:
        return "mace-hdf5"
    if fmt in (None, "extxyz", "xyz") and path.suffix in (".xyz", ".extxyz"):
        return "extxyz"
    return "ase"


def _extxyz_offsets(path: Path) -> list[int]:
    """Byte offset of every frame of an extxyz file, and the file's end (one line-by-line pass)."""
    offsets = []
    with open(path, "rb") as handle:
        position = 0
        while True:
            line = handle.readline()
            if not line:
                break
            if not line.strip():  # blank trailing lines
                position += len(line)
                continue
            try:
                count = int(line.split()[0])
            except ValueError:
                raise DataError(
                    f"{path}: configuration {len(offsets)}: expected an atom count, got {line[:40]!r}; "
                    "not an extxyz file (set data.format / --format)"
                ) from None
            offsets.append(position)
            position += len(line)
            for _ in range(count + 1):
                position += len(handle.readline())
    offsets.append(position)
    return offsets


def _mace_hdf5_keys(path: Path) -> list[tuple[str, str]]:
    with h5py.File(path, "r") as handle:
        batches = sorted((k for k in handle if k.startswith("config_batch_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        if not batches:
            raise DataError(f"{path}: no config_batch_* groups; not a mace-torch HDF5 data set (set data.format)")
        return [(b, c) for b in batches for c in sorted(handle[b], key=lambda k: int(k.rsplit("_", 1)[1]))]


def _lmdb_dataset(path: Path) -> Any:
    from mace.tools.fairchem_dataset import AseDBDataset

    return AseDBDataset(config={"src": str(path)})


def _unpack(value: Any) -> Any:
    """mace-torch HDF5 stores absent values as the string ``"None"`` and strings as bytes."""
    if isinstance(value, bytes):
        value = value.decode()
    return None if isinstance(value, str) and value == "None" else value


def _read_range(
    kind: str, path: Path, fmt: str | None, start: int, stop: int, byte_range: Sequence[int] | None = None
) -> list[Atoms]:
    """Configurations ``start`` to ``stop`` of one source, as ASE atoms with their labels (an extxyz
    chunk is read from its ``byte_range`` alone)."""
    try:
        if kind == "extxyz":
            assert byte_range is not None
            with open(path, "rb") as handle:
                handle.seek(byte_range[0])
                text = handle.read(byte_range[1] - byte_range[0]).decode()
            frames = ase.io.read(io.StringIO(text), index=":", format="extxyz")
            return frames if isinstance(frames, list) else [frames]
        if kind == "ase":
            frames = ase.io.read(path, index=f"{start}:{stop}", format=fmt)
            return frames if isinstance(frames, list) else [frames]
        if kind == "mace-hdf5":
            keys = _mace_hdf5_keys(path)[start:stop]
            frames = []
            with h5py.File(path, "r") as handle:
                for batch, config in keys:
                    group = handle[batch][config]
                    atoms = Atoms(
                        numbers=group["atomic_numbers"][()],
                        positions=group["positions"][()],
                        cell=_unpack(group["cell"][()]),
                        pbc=_unpack(group["pbc"][()]),
                    )
                    for name, dataset in group["properties"].items():
                        value = _unpack(dataset[()])
                        if value is None:
                            continue
                        array = np.asarray(value)
                        per_atom = array.ndim >= 1 and array.shape[0] == len(atoms) and name in PER_ATOM_RESULTS
                        (atoms.arrays if per_atom else atoms.info)[name] = array if array.ndim else array.item()
                    if "config_type" in group and _unpack(group["config_type"][()]) is not None:
                        atoms.info["config_type"] = _unpack(group["config_type"][()])
                    frames.append(atoms)
            return frames
        if kind == "mace-lmdb":
            dataset = _lmdb_dataset(path)
            return [dataset.get_atoms(dataset.ids[i]) for i in range(start, stop)]
    except DataError:
        raise
    except Exception as exc:  # a reader raises many types for a bad file; all mean "cannot parse"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(
            f"{path}: cannot read configurations {start}-{stop - 1} as {kind} ({reason}); set --format"
        ) from None
    raise ValueError(kind)


def _count(kind: str, path: Path, fmt: str | None) -> tuple[int, list[int] | None]:
    """Number of configurations of a source (and the extxyz frame offsets)."""
    if kind == "extxyz":
        offsets = _extxyz_offsets(path)
        return len(offsets) - 1, offsets
    if kind == "mace-hdf5":
        return len(_mace_hdf5_keys(path)), None
    if kind == "mace-lmdb":
        return len(_lmdb_dataset(path)), None
    return -1, None  # any other ASE format: counted while it is read


# ---- converting configurations to columns -----------------------------------------------------


def _labels_of(atoms: Atoms) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per-configuration and per-atom labels of ``atoms``: info/arrays, then calculator results
    under their own names where info/arrays do not already hold that name."""
    info = dict(atoms.info)
    arrays = {k: v for k, v in atoms.arrays.items() if k not in ("numbers", "positions")}
    results = getattr(atoms.calc, "results", None) or {}
    for key, value in results.items():
        array = np.asarray(value)
        if key in PER_ATOM_RESULTS and array.ndim >= 1 and array.shape[0] == len(atoms):
            arrays.setdefault(key, array)
            info.pop(key, None)  # aselmdb rows repeat per-atom results in info
        elif key not in info:
            info[key] = value
    return info, arrays


def _scalar(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _kind(values: list[Any]) -> tuple[str, tuple[int, ...]] | None:
    """How one info key is stored: (``bool``|``int``|``float``|``str``, shape); None to leave it out."""
    values = [_scalar(v) for v in values]
    if all(isinstance(v, bool) for v in values):
        return "bool", ()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int", ()
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "float", ()
    arrays = [np.asarray(v) for v in values]
    if all(a.dtype.kind in "iuf" and a.ndim >= 1 for a in arrays) and len({a.shape for a in arrays}) == 1:
        return "float", arrays[0].shape
    if all(isinstance(v, str | int | float | bool) for v in values):
        return "str", ()
    return None


@dataclass
class _Chunk:
    """One chunk's configurations as columns, ready to be written."""

    n_atoms: list[int]
    source_index: list[int]
    cells: list[np.ndarray]
    pbc: list[np.ndarray]
    numbers: list[np.ndarray]
    positions: list[np.ndarray]
    info: dict[str, dict[int, Any]]  # key -> {row: value}
    arrays: dict[str, dict[int, np.ndarray]]
    skipped: list[tuple[int, str]]


def _columns(frames: Sequence[Atoms], first: int, where: str, skip_bad: bool) -> _Chunk:
    chunk = _Chunk([], [], [], [], [], [], {}, {}, [])
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}  # per-atom key -> (trailing shape, first source index)
    for offset, atoms in enumerate(frames):
        index = first + offset
        here = f"{where}: configuration {index}"
        try:
            check_geometry(atoms, here)
            info, arrays = _labels_of(atoms)
            for key, value in info.items():
                value = _scalar(value)
                if isinstance(value, float) and not np.isfinite(value):
                    raise DataError(f"{here}: {key} is {value}; fix or drop the configuration")
                if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise DataError(f"{here}: {key} contains NaN/inf; fix or drop the configuration")
            checked: dict[str, np.ndarray] = {}
            for key, value in arrays.items():
                array = np.asarray(value)
                if array.dtype.kind not in "iuf":
                    continue
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise DataError(f"{here}: {key} contains NaN/inf; fix or drop the configuration")
                trailing = array.shape[1:]
                seen = shapes.setdefault(key, (trailing, index))
                if seen[0] != trailing:
                    raise DataError(
                        f"{here}: {key} has shape {array.shape}, but rows of shape {seen[0]} in configuration "
                        f"{seen[1]}; store one x, y, z row per atom"
                    )
                checked[key] = array
        except DataError as exc:
            if not skip_bad:
                raise
            chunk.skipped.append((index, str(exc).removeprefix(f"{here}: ")))
            continue
        row = len(chunk.n_atoms)
        chunk.n_atoms.append(len(atoms))
        chunk.source_index.append(index)
        chunk.cells.append(np.asarray(atoms.cell.array, dtype=float))
        chunk.pbc.append(np.asarray(atoms.pbc, dtype=bool))
        chunk.numbers.append(np.asarray(atoms.numbers, dtype=np.uint8))
        chunk.positions.append(np.asarray(atoms.positions, dtype=float))
        for key, value in info.items():
            chunk.info.setdefault(key, {})[row] = value
        for key, array in checked.items():
            chunk.arrays.setdefault(key, {})[row] = array
    return chunk


def _write_chunk(chunk: _Chunk, path: Path, source: int) -> dict[str, Any]:
    """Write one shard (to a temporary name, renamed when complete); its summary."""
    n = len(chunk.n_atoms)
    atoms_total = int(sum(chunk.n_atoms))
    starts = np.concatenate([[0], np.cumsum(chunk.n_atoms)]).astype(np.int64)
    summary: dict[str, Any] = {"configs": n, "atoms": atoms_total, "source": source, "info": {}, "arrays": {}}
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as handle:
        handle.attrs["store_format"] = STORE_FORMAT
        handle.attrs["source"] = source
        handle["n_atoms"] = np.asarray(chunk.n_atoms, dtype=np.int32)
        handle["source_index"] = np.asarray(chunk.source_index, dtype=np.int64)
        handle["cell"] = np.asarray(chunk.cells, dtype=float).reshape(n, 3, 3)
        handle["pbc"] = np.asarray(chunk.pbc, dtype=bool).reshape(n, 3)
        handle["numbers"] = np.concatenate(chunk.numbers) if n else np.zeros(0, np.uint8)
        handle["positions"] = np.concatenate(chunk.positions) if n else np.zeros((0, 3))
        for key, by_row in chunk.info.items():
            kind = _kind(list(by_row.values()))
            if kind is None:
                continue
            name, shape = kind
            mask = np.zeros(n, dtype=bool)
            mask[list(by_row)] = True
            if name == "str":
                column = np.array([str(_scalar(by_row.get(r, ""))) for r in range(n)], dtype=object)
                handle.create_dataset(f"info/{_escape(key)}", data=column, dtype=h5py.string_dtype())
            else:
                dtype = {"bool": np.uint8, "int": np.int64, "float": np.float64}[name]
                column = np.zeros((n, *shape), dtype=dtype)
                if name == "float":
                    column[:] = np.nan
                for r, value in by_row.items():
                    column[r] = np.asarray(_scalar(value), dtype=dtype)
                handle[f"info/{_escape(key)}"] = column
            handle[f"info_mask/{_escape(key)}"] = mask
            summary["info"][key] = {"kind": name, "shape": list(shape), "count": int(mask.sum())}
        for key, by_row in chunk.arrays.items():
            trailing = next(iter(by_row.values())).shape[1:]
            column = np.full((atoms_total, *trailing), np.nan)
            mask = np.zeros(n, dtype=bool)
            for r, array in by_row.items():
                column[starts[r] : starts[r + 1]] = array
                mask[r] = True
            handle[f"arrays/{_escape(key)}"] = column
            handle[f"arrays_mask/{_escape(key)}"] = mask
            summary["arrays"][key] = {"shape": list(trailing), "count": int(mask.sum())}
    os.replace(tmp, path)
    elements = np.unique(np.concatenate(chunk.numbers)) if n else np.zeros(0, int)
    summary["elements"] = [int(z) for z in elements]
    summary["skipped"] = chunk.skipped
    return summary


def _convert_task(task: dict[str, Any]) -> dict[str, Any]:
    """A worker's unit: read one chunk of one source, convert, write its shard and summary."""
    path = Path(task["path"])
    frames = _read_range(task["kind"], path, task["format"], task["start"], task["stop"], task.get("bytes"))
    chunk = _columns(frames, task["start"], str(path), task["skip_bad"])
    summary = _write_chunk(chunk, Path(task["shard"]), task["source"])
    summary["start"], summary["stop"] = task["start"], task["stop"]
    atomic_write_text(Path(task["shard"]).with_suffix(".json"), json.dumps(summary))
    return summary


def _init_worker() -> None:
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"


# ---- writing a store --------------------------------------------------------------------------


def _source_record(path: Path, fmt: str | None) -> dict[str, Any]:
    kind = source_kind(path, fmt)
    if kind == "store":
        raise DataError(f"{path}: already a store; use it directly (give its folder as data)")
    stat = path.stat()
    digest = file_sha256(path) if path.is_file() else _folder_sha256(path)
    return {
        "path": str(path.resolve()),
        "kind": kind,
        "format": fmt,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": digest,
    }


def _folder_sha256(path: Path) -> str:
    """Content hash of a folder source (an LMDB directory): its files' names and bytes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith("-lock")):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def preprocess(
    files: Sequence[str | Path],
    out: Path,
    workers: int = 1,
    fmt: str | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    chunk: int = CHUNK,
) -> Store:
    """Convert ``files`` into the store ``out`` with ``workers`` processes; resume an interrupted one.

    Chunks of ``chunk`` configurations are converted independently, each into a shard written to a
    temporary name and renamed when complete; ``manifest.json`` is written last. Rerunning the same
    command on an interrupted store keeps its finished shards.
    """
    out = Path(out)
    if workers < 1:
        raise DataError(f"--workers {workers}: give at least 1")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: data file not found; check the path")
    if (out / MANIFEST).is_file():
        if not overwrite:
            raise RunError(f"{out}: already holds a store; pass --overwrite to rebuild it, or choose another --out")
        for item in out.iterdir():
            if item.name in (MANIFEST, PLAN, SKIPPED) or item.name.startswith("shard-"):
                item.unlink()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sources = [_source_record(p, fmt) for p in paths]
    plan_path = out / PLAN
    tasks, counts = _plan(sources, out, chunk, skip_bad)
    plan = {"store_format": STORE_FORMAT, "sources": sources, "chunk": chunk, "skip_bad": skip_bad}
    if plan_path.is_file():
        earlier = json.loads(plan_path.read_text())
        if _identity(earlier) != _identity(plan):
            raise RunError(
                f"{out}: an unfinished store of other files or settings is here; rerun with the same files and "
                "options to finish it, pass --overwrite to start again, or choose another --out"
            )
    atomic_write_text(plan_path, json.dumps(plan, indent=2))
    summaries: dict[int, dict[str, Any]] = {}
    pending = []
    for k, task in enumerate(tasks):
        shard, sidecar = Path(task["shard"]), Path(task["shard"]).with_suffix(".json")
        if shard.is_file() and sidecar.is_file():
            summaries[k] = json.loads(sidecar.read_text())
        else:
            pending.append(k)
    if len(pending) < len(tasks):
        log.info("%s: %d of %d shards already converted, resuming", out, len(tasks) - len(pending), len(tasks))
    if pending:
        _run(tasks, pending, workers, summaries)
    manifest = _manifest(out, sources, tasks, summaries, counts, skip_bad, time.perf_counter() - started)
    store = Store(out)
    log.info(
        "%s: %d configurations (%d atoms) from %d file(s) in %.1f s%s",
        out,
        manifest["configs"],
        manifest["atoms"],
        len(sources),
        manifest["seconds"],
        f", {manifest['skipped']} skipped (see {SKIPPED})" if manifest["skipped"] else "",
    )
    return store


def _identity(plan: dict[str, Any]) -> Any:
    """What must match for an unfinished store to be finished: the sources' content (not their
    paths or times), the chunking and the bad-input policy."""
    contents = [(s["sha256"], s["kind"], s["format"]) for s in plan.get("sources", [])]
    return plan.get("store_format"), contents, plan.get("chunk"), plan.get("skip_bad")


def _plan(
    sources: list[dict[str, Any]], out: Path, chunk: int, skip_bad: bool
) -> tuple[list[dict[str, Any]], list[int]]:
    """One task per chunk of each source (sources whose length is unknown up front are read in one
    task: ASE formats other than extxyz cannot be split without reading them)."""
    tasks: list[dict[str, Any]] = []
    counts = []
    for s, source in enumerate(sources):
        path = Path(source["path"])
        count, offsets = _count(source["kind"], path, source["format"])
        counts.append(count)
        if count == 0:
            raise DataError(f"{path}: empty file, no configurations in the file; give a file with at least one")
        if count < 0:  # read whole, to learn its length
            frames = _read_range("ase", path, source["format"], 0, 1 << 62, None) if path.stat().st_size else []
            if not frames:
                raise DataError(f"{path}: empty file, no configurations in the file; give a file with at least one")
            count = len(frames)
            counts[-1] = count
        for start in range(0, count, chunk):
            stop = min(count, start + chunk)
            task = {
                "path": str(path),
                "kind": source["kind"],
                "format": source["format"],
                "source": s,
                "start": start,
                "stop": stop,
                "skip_bad": skip_bad,
                "shard": str(out / f"shard-{len(tasks):05d}.h5"),
            }
            if offsets is not None:
                task["bytes"] = (offsets[start], offsets[stop])
            tasks.append(task)
    return tasks, counts


def _run(tasks: list[dict[str, Any]], pending: list[int], workers: int, summaries: dict[int, dict[str, Any]]) -> None:
    done = 0
    if workers == 1:
        for k in pending:
            summaries[k] = _convert_task(tasks[k])
            done += 1
            log.info("converted shard %d/%d", done, len(pending))
        return
    context = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(_convert_task, tasks[k]): k for k in pending}
        try:
            for future in cf.as_completed(futures):
                summaries[futures[future]] = future.result()
                done += 1
                log.info("converted shard %d/%d", done, len(pending))
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _manifest(
    out: Path,
    sources: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
    summaries: dict[int, dict[str, Any]],
    counts: list[int],
    skip_bad: bool,
    seconds: float,
) -> dict[str, Any]:
    shards, info, arrays, elements, skipped = [], {}, {}, set(), []
    per_source_elements: list[set[int]] = [set() for _ in sources]
    per_source_keys: list[dict[str, dict[str, int]]] = [{"info": {}, "arrays": {}} for _ in sources]
    for k, task in enumerate(tasks):
        summary = summaries[k]
        shards.append(
            {
                "file": Path(task["shard"]).name,
                "configs": summary["configs"],
                "atoms": summary["atoms"],
                "source": task["source"],
            }
        )
        elements |= set(summary["elements"])
        per_source_elements[task["source"]] |= set(summary["elements"])
        for key, meta in summary["info"].items():
            merged = info.setdefault(key, {"kind": meta["kind"], "shape": meta["shape"], "count": 0})
            if merged["kind"] != meta["kind"]:
                merged["kind"] = "float" if {merged["kind"], meta["kind"]} <= {"int", "float", "bool"} else "str"
            merged["count"] += meta["count"]
            counted = per_source_keys[task["source"]]["info"]
            counted[key] = counted.get(key, 0) + meta["count"]
        for key, meta in summary["arrays"].items():
            merged = arrays.setdefault(key, {"shape": meta["shape"], "count": 0})
            if merged["shape"] != meta["shape"]:
                where = f"{sources[task['source']]['path']}: configuration {summary['start']}"
                raise DataError(
                    f"{where} onwards: {key} has rows of shape {meta['shape']}, other configurations "
                    f"{merged['shape']}; store one x, y, z row per atom"
                )
            merged["count"] += meta["count"]
            counted = per_source_keys[task["source"]]["arrays"]
            counted[key] = counted.get(key, 0) + meta["count"]
        skipped += [(sources[task["source"]]["path"], index, reason) for index, reason in summary["skipped"]]
    for s, source in enumerate(sources):
        source["configs"] = counts[s]
        source["elements"] = sorted(per_source_elements[s])
        source["keys"] = per_source_keys[s]
    if skipped:
        lines = ["source\tindex\treason", *(f"{p}\t{i}\t{r}" for p, i, r in skipped)]
        atomic_write_text(out / SKIPPED, "\n".join(lines) + "\n")
    manifest = {
        "store_format": STORE_FORMAT,
        "mace_mf": __version__,
        "sources": sources,
        "shards": shards,
        "configs": sum(s["configs"] for s in shards),
        "atoms": sum(s["atoms"] for s in shards),
        "elements": sorted(elements),
        "info": info,
        "arrays": arrays,
        "skip_bad": skip_bad,
        "skipped": len(skipped),
        "seconds": round(seconds, 2),
    }
    if not manifest["configs"]:
        raise DataError(
            f"{', '.join(s['path'] for s in sources)}: every configuration was skipped; see {out / SKIPPED}"
        )
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


# ---- reading a store --------------------------------------------------------------------------


@dataclass
class Record:
    """One configuration as stored: geometry and the labels asked for (None where absent)."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    info: dict[str, Any]
    arrays: dict[str, np.ndarray | None]


class _Shard:
    """One shard file, read through a memory map: its datasets are contiguous and uncompressed, so
    each is a numpy view at a fixed offset of the file, and reading a configuration is slicing (no
    per-read HDF5 call). Text columns, the only ones that cannot be mapped, are read with h5py."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.layout: dict[str, tuple[int | None, np.dtype, tuple[int, ...]]] = {}
        with h5py.File(path, "r") as handle:

            def visit(name: str, item: Any) -> None:
                if isinstance(item, h5py.Dataset):
                    self.layout[name] = (item.id.get_offset(), item.dtype, item.shape)

            handle.visititems(visit)
        self._map: mmap.mmap | None = None
        self._views: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None, "_views": {}}

    def has(self, name: str) -> bool:
        return name in self.layout

    def column(self, name: str) -> np.ndarray:
        """The whole dataset ``name`` (a view of the mapped file where it can be)."""
        view = self._views.get(name)
        if view is not None:
            return view
        offset, dtype, shape = self.layout[name]
        if dtype.kind == "O" or offset is None:  # text, or an empty dataset (never allocated)
            with h5py.File(self.path, "r") as handle:
                data = handle[name][()]
            if dtype.kind == "O":
                data = np.array([v.decode() if isinstance(v, bytes) else v for v in data], dtype=object)
            view = np.asarray(data).reshape(shape)
        else:
            if self._map is None:
                with open(self.path, "rb") as handle:
                    self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            count = int(np.prod(shape))
            view = np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)
        self._views[name] = view
        return view

    def close(self) -> None:
        self._views = {}
        if self._map is not None:
            self._map.close()
            self._map = None


class Store:
    """A store opened for reading. Shards are mapped lazily, per process (a DataLoader worker that
    forks after the parent mapped one maps its own), and only the rows asked for are touched."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            if (self.path / PLAN).is_file():
                raise DataError(
                    f"{self.path}: the store was not finished (preprocessing was interrupted); run the same "
                    "mace-mf preprocess command again to complete it"
                )
            raise DataError(f"{self.path}: not a mace_mf store (no {MANIFEST}); make one with mace-mf preprocess")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("store_format") != STORE_FORMAT:
            raise DataError(
                f"{self.path}: store format {self.manifest.get('store_format')} is not {STORE_FORMAT}; "
                "rebuild it with this mace_mf's mace-mf preprocess"
            )
        counts = [s["configs"] for s in self.manifest["shards"]]
        self.bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._shards: dict[int, _Shard] = {}
        self._starts: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}, "_starts": {}}

    @property
    def sources(self) -> list[dict[str, Any]]:
        return self.manifest["sources"]

    @property
    def elements(self) -> list[int]:
        return self.manifest["elements"]

    def shard(self, index: int) -> _Shard:
        if os.getpid() != self._pid:  # forked: the parent's maps are not ours
            self._shards, self._pid = {}, os.getpid()
        shard = self._shards.get(index)
        if shard is None:
            shard = self._shards[index] = _Shard(self.path / self.manifest["shards"][index]["file"])
        return shard

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards = {}

    def locate(self, row: int) -> tuple[int, int]:
        """(shard, row within the shard) of a store row."""
        if not 0 <= row < len(self):
            raise IndexError(row)
        shard = int(np.searchsorted(self.bounds, row, side="right") - 1)
        return shard, row - int(self.bounds[shard])

    def _atom_starts(self, shard: int) -> np.ndarray:
        starts = self._starts.get(shard)
        if starts is None:
            n_atoms = self.shard(shard).column("n_atoms")
            starts = self._starts[shard] = np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64)
        return starts

    def where(self, row: int) -> str:
        """``<source file>: configuration <index>`` of a store row, for error messages."""
        shard, local = self.locate(row)
        index = int(self.shard(shard).column("source_index")[local])
        source = self.sources[self.manifest["shards"][shard]["source"]]
        return f"{source['path']}: configuration {index}"

    def record(self, row: int, info: Sequence[str] = (), arrays: Sequence[str] = ()) -> Record:
        """Geometry of ``row`` and its labels under the keys asked for (copies, safe to keep)."""
        index, local = self.locate(row)
        shard = self.shard(index)
        starts = self._atom_starts(index)
        a, b = int(starts[local]), int(starts[local + 1])
        info_values: dict[str, Any] = {}
        for key in info:
            name = _escape(key)
            present = shard.has(f"info/{name}") and bool(shard.column(f"info_mask/{name}")[local])
            info_values[key] = _scalar(shard.column(f"info/{name}")[local]) if present else None
        array_values: dict[str, np.ndarray | None] = {}
        for key in arrays:
            name = _escape(key)
            present = shard.has(f"arrays/{name}") and bool(shard.column(f"arrays_mask/{name}")[local])
            array_values[key] = np.array(shard.column(f"arrays/{name}")[a:b]) if present else None
        return Record(
            shard.column("numbers")[a:b].astype(np.int64),
            np.array(shard.column("positions")[a:b]),
            np.array(shard.column("cell")[local]),
            np.array(shard.column("pbc")[local]),
            info_values,
            array_values,
        )

    def keys_of(self, row: int) -> tuple[list[str], list[str]]:
        """The info and per-atom label keys stored in ``row``'s shard."""
        shard = self.shard(self.locate(row)[0])
        info = [_unescape(n.split("/", 1)[1]) for n in shard.layout if n.startswith("info/")]
        arrays = [_unescape(n.split("/", 1)[1]) for n in shard.layout if n.startswith("arrays/")]
        return info, arrays

    def atoms(self, row: int) -> Atoms:
        """``row`` as ASE atoms with every stored label in ``info``/``arrays``."""
        info_keys, array_keys = self.keys_of(row)
        record = self.record(row, info_keys, array_keys)
        atoms = Atoms(numbers=record.numbers, positions=record.positions, cell=record.cell, pbc=record.pbc)
        for key, value in record.info.items():
            if value is not None:
                kind = self.manifest["info"].get(key, {}).get("kind")
                atoms.info[key] = bool(value) if kind == "bool" else value
        for key, value in record.arrays.items():
            if value is not None:
                atoms.arrays[key] = value
        return atoms

    def info_column(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(values, present)`` of one per-configuration label over every row (``values`` holds
        strings where any shard stored the key as text)."""
        values, present = [], []
        name = _escape(key)
        for index, meta in enumerate(self.manifest["shards"]):
            shard = self.shard(index)
            if shard.has(f"info/{name}"):
                values.append(np.array(shard.column(f"info/{name}")))
                present.append(np.array(shard.column(f"info_mask/{name}")))
            else:
                values.append(np.full(meta["configs"], np.nan))
                present.append(np.zeros(meta["configs"], dtype=bool))
        if any(v.dtype.kind == "O" for v in values):
            values = [v.astype(object) for v in values]
        return np.concatenate(values), np.concatenate(present)

    def array_mask(self, key: str) -> np.ndarray:
        """Which rows carry the per-atom label ``key``."""
        name, masks = _escape(key), []
        for index, meta in enumerate(self.manifest["shards"]):
            shard = self.shard(index)
            present = shard.has(f"arrays_mask/{name}")
            masks.append(np.array(shard.column(f"arrays_mask/{name}")) if present else np.zeros(meta["configs"], bool))
        return np.concatenate(masks)

    def n_atoms(self) -> np.ndarray:
        return np.concatenate([np.array(self.shard(s).column("n_atoms")) for s in range(len(self.manifest["shards"]))])

    def element_counts(self, rows: np.ndarray, zs: Sequence[int]) -> np.ndarray:
        """``[len(rows), len(zs)]`` element counts of the given rows."""
        lookup = np.full(256, len(zs), dtype=np.int64)
        lookup[list(zs)] = np.arange(len(zs))
        counts = np.zeros((len(rows), len(zs)))
        for position, row in enumerate(np.asarray(rows)):
            index, local = self.locate(int(row))
            starts = self._atom_starts(index)
            numbers = self.shard(index).column("numbers")[starts[local] : starts[local + 1]]
            counts[position] = np.bincount(lookup[numbers], minlength=len(zs) + 1)[: len(zs)]
        return counts

    def check_sources(self) -> None:
        """Refuse a store whose source files have changed since it was built (same path, other
        content); sources that are gone are fine: a store stands on its own."""
        for source in self.sources:
            path = Path(source["path"])
            if not path.exists():
                continue
            stat = path.stat()
            if stat.st_size == source["size"] and stat.st_mtime_ns == source["mtime_ns"]:
                continue
            digest = file_sha256(path) if path.is_file() else _folder_sha256(path)
            if digest != source["sha256"]:
                raise DataError(
                    f"{self.path}: built from {path}, which has changed since; rebuild the store "
                    f"(mace-mf preprocess {path} --out {self.path} --overwrite)"
                )


# ---- stores behind recipe data ----------------------------------------------------------------


def cache_root(configured: str | Path | None) -> Path:
    """Where stores of recipe data are cached: ``data.store_cache``, else ``$MACE_MF_CACHE/stores``,
    else ``~/.cache/mace_mf/stores`` (shared by every run, bench arm, sweep trial and rank)."""
    if configured:
        return Path(configured)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "stores"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mace_mf" / "stores"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (one process builds a cached store; the others wait, then read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _content_hash(path: Path, cache: Path) -> str:
    """A source's content hash, remembered by (path, size, mtime) so that unchanged files are not
    read again."""
    stat = path.stat()
    memo = cache / "paths" / (hashlib.sha1(str(path.resolve()).encode()).hexdigest() + ".json")
    if memo.is_file():
        known = json.loads(memo.read_text())
        if known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
            return known["sha256"]
    digest = file_sha256(path) if path.is_file() else _folder_sha256(path)
    atomic_write_text(memo, json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}))
    return digest


def open_data(path: str | Path, fmt: str | None, cache: Path, workers: int = 1) -> Store:
    """The store behind one data entry: a store folder as it is (its sources checked), or the cached
    store of a source file, converted on first use."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found; check data.* in the recipe")
    kind = source_kind(path, fmt)
    if kind == "store":
        store = Store(path)
        store.check_sources()
        return store
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file, no configurations in the file; give a file with at least one")
    key = f"{_content_hash(path, cache)[:24]}-{kind}-{fmt or 'auto'}-v{STORE_FORMAT}"
    folder = cache / key
    if (folder / MANIFEST).is_file():
        return Store(folder)
    with _locked(cache / f"{key}.lock"):
        if not (folder / MANIFEST).is_file():
            log.info("%s: converting to a store in %s (once; later runs reuse it)", path, folder)
            preprocess([path], folder, workers=workers, fmt=fmt)
    return Store(folder)


class Configurations:
    """One or more stores indexed as one (``data.train`` may name several files): row ``r`` of the
    second store is row ``len(first) + r`` here."""

    def __init__(self, stores: Sequence[Store]) -> None:
        self.stores = list(stores)
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.stores])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, row: int) -> tuple[Store, int]:
        k = int(np.searchsorted(self.offsets, row, side="right") - 1)
        if not 0 <= row < len(self):
            raise IndexError(row)
        return self.stores[k], row - int(self.offsets[k])

    def record(self, row: int, info: Sequence[str] = (), arrays: Sequence[str] = ()) -> Record:
        store, local = self.locate(row)
        return store.record(local, info, arrays)

    def atoms(self, row: int) -> Atoms:
        store, local = self.locate(row)
        return store.atoms(local)

    def where(self, row: int) -> str:
        store, local = self.locate(row)
        return store.where(local)

    @property
    def elements(self) -> set[int]:
        return {z for s in self.stores for z in s.elements}

    def info_kind(self, key: str) -> dict[str, Any] | None:
        """The key's manifest entry (kind, shape, count) merged over the stores; None if none has it."""
        entries = [s.manifest["info"][key] for s in self.stores if key in s.manifest["info"]]
        if not entries:
            return None
        kinds = {e["kind"] for e in entries}
        kind = entries[0]["kind"] if len(kinds) == 1 else ("float" if kinds <= {"int", "float", "bool"} else "str")
        return {"kind": kind, "shapes": sorted({tuple(e["shape"]) for e in entries})}

    def array_shapes(self, key: str) -> set[tuple[int, ...]]:
        return {tuple(s.manifest["arrays"][key]["shape"]) for s in self.stores if key in s.manifest["arrays"]}

    def info_column(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [s.info_column(key) for s in self.stores]
        values = [p[0] for p in parts]
        if any(v.dtype.kind == "O" for v in values):
            values = [v.astype(object) for v in values]
        return np.concatenate(values), np.concatenate([p[1] for p in parts])

    def array_mask(self, key: str) -> np.ndarray:
        return np.concatenate([s.array_mask(key) for s in self.stores])

    def n_atoms(self) -> np.ndarray:
        return np.concatenate([s.n_atoms() for s in self.stores])

    def element_counts(self, rows: np.ndarray, zs: Sequence[int]) -> np.ndarray:
        counts = np.zeros((len(rows), len(zs)))
        store_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for k in np.unique(store_of):
            sel = np.flatnonzero(store_of == k)
            counts[sel] = self.stores[int(k)].element_counts(np.asarray(rows)[sel] - self.offsets[k], zs)
        return counts


def open_configurations(paths: str | Sequence[str], fmt: str | None, cache: Path, workers: int = 1) -> Configurations:
    """The configurations of one data entry (one path or several), through their stores."""
    return Configurations([open_data(p, fmt, cache, workers) for p in ([paths] if isinstance(paths, str) else paths)])
