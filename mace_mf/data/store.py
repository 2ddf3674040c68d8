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
import multiprocessing as mp
import os
import shutil
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
from scipy.spatial.distance import pdist

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
# datasets every shard has, whatever its labels (a shard without one was not written by this format)
SHARD_DATASETS = ("n_atoms", "atom_start", "source_index", "cell", "pbc", "numbers", "positions")
OPEN_SHARDS = 256  # file descriptors a process keeps open per store (the rest reopen on demand)


def _escape(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F")


def _unescape(name: str) -> str:
    return name.replace("%2F", "/").replace("%25", "%")


def check_geometry(atoms: Atoms, where: str) -> None:
    """Refuse geometries that no potential should be fitted to."""
    if len(atoms) < 2:
        raise DataError(f"{where}: a configuration with {len(atoms)} atom(s); isolated atoms are fixed by E0s, drop it")
    if atoms.pbc.any():
        distances = atoms.get_all_distances(mic=True)
        np.fill_diagonal(distances, np.inf)
        closest = float(distances.min())
    else:  # a molecule: every pair, without ASE's minimum-image machinery (10x faster)
        closest = float(pdist(atoms.positions).min())
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


def _extxyz_frames(path: Path, block: int = 1 << 26) -> Iterator[tuple[int, int]]:
    """``(first byte, end byte)`` of each frame of an extxyz file, found by reading blocks and
    jumping from one atom-count line to the next through the block's newline positions (a frame's
    atom lines are never parsed here: about ten times faster than reading line by line)."""
    with open(path, "rb") as handle:
        buffer, base, frame = b"", 0, 0
        while True:
            more = handle.read(block)
            buffer += more
            ends = np.flatnonzero(np.frombuffer(buffer, dtype=np.uint8) == 10)
            position = 0  # within buffer: the start of the next frame's count line
            while True:
                line = int(np.searchsorted(ends, position))
                if line >= len(ends):
                    break  # the count line itself is not complete in the buffer
                header = buffer[position : ends[line]]
                if not header.strip():  # blank lines between or after frames
                    position = int(ends[line]) + 1
                    continue
                try:
                    count = int(header.split()[0])
                except ValueError:
                    raise DataError(
                        f"{path}: configuration {frame}: expected an atom count, got {header[:40]!r}; "
                        "not an extxyz file (set data.format / --format)"
                    ) from None
                last = line + count + 1  # the comment line, then one line per atom
                if last >= len(ends):
                    if not more and last == len(ends) and position < len(buffer):  # no final newline
                        yield base + position, base + len(buffer)
                        frame += 1
                        position = len(buffer)
                    break
                yield base + position, base + int(ends[last]) + 1
                frame += 1
                position = int(ends[last]) + 1
            buffer, base = buffer[position:], base + position
            if not more:
                if buffer.strip():
                    raise DataError(f"{path}: configuration {frame} is cut short; the file is truncated")
                return


def _extxyz_chunks(path: Path, chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """``(first frame, end frame, first byte, end byte)`` of each run of ``chunk`` frames, yielded
    while the file is scanned (conversion starts before the scan ends)."""
    start_frame, start_byte, frames, end = 0, 0, 0, 0
    for first, end in _extxyz_frames(path):
        if frames == start_frame:
            start_byte = first
        frames += 1
        if frames - start_frame == chunk:
            yield start_frame, frames, start_byte, end
            start_frame = frames
    if frames > start_frame:
        yield start_frame, frames, start_byte, end


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


def _count(kind: str, path: Path, fmt: str | None) -> int:
    """Number of configurations of a mace-torch source, or of any other ASE file (read whole)."""
    if kind == "mace-hdf5":
        return len(_mace_hdf5_keys(path))
    if kind == "mace-lmdb":
        return len(_lmdb_dataset(path))
    frames = _read_range("ase", path, fmt, 0, 1 << 62) if path.stat().st_size else []
    return len(frames)


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
        handle["atom_start"] = starts
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


def _source_record(path: Path, fmt: str | None, digest: str | None) -> dict[str, Any]:
    kind = source_kind(path, fmt)
    if kind == "store":
        raise DataError(f"{path}: already a store; use it directly (give its folder as data)")
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "kind": kind,
        "format": fmt,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": digest,
    }


def _digest(path: Path) -> str:
    return file_sha256(path) if path.is_file() else _folder_sha256(path)


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
    digests: Sequence[str] | None = None,
) -> Store:
    """Convert ``files`` into the store ``out`` with ``workers`` processes; resume an interrupted one.

    Chunks of ``chunk`` configurations are converted independently, each into a shard written to a
    temporary name and renamed when complete; ``manifest.json`` is written last. Rerunning the same
    command on an interrupted store keeps its finished shards. The files are scanned for chunk
    boundaries and hashed (``digests``, when the caller knows them, are not recomputed) while the
    first chunks are already being converted.
    """
    out = Path(out)
    if workers < 1:
        raise DataError(f"--workers {workers}: give at least 1")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: data file not found; check the path")
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: empty file, no configurations in the file; give a file with at least one")
    if (out / MANIFEST).is_file():
        if not overwrite:
            raise RunError(f"{out}: already holds a store; pass --overwrite to rebuild it, or choose another --out")
        for item in out.iterdir():
            if item.name in (MANIFEST, PLAN, SKIPPED) or item.name.startswith("shard-"):
                item.unlink()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sources = [_source_record(p, fmt, d) for p, d in zip(paths, digests or [None] * len(paths), strict=True)]
    plan_path = out / PLAN
    with cf.ThreadPoolExecutor(1) as hasher:
        hashing = {i: hasher.submit(_digest, paths[i]) for i, s in enumerate(sources) if s["sha256"] is None}

        def hashed() -> None:
            for i, future in hashing.items():
                sources[i]["sha256"] = future.result()

        plan = {"store_format": STORE_FORMAT, "sources": sources, "chunk": chunk, "skip_bad": skip_bad}
        if plan_path.is_file():  # resuming: only the same content may be finished
            hashed()
            if _identity(json.loads(plan_path.read_text())) != _identity(plan):
                raise RunError(
                    f"{out}: an unfinished store of other files or settings is here; rerun with the same files and "
                    "options to finish it, pass --overwrite to start again, or choose another --out"
                )
        atomic_write_text(plan_path, json.dumps(plan, indent=2))
        counts = [0] * len(sources)
        tasks: list[dict[str, Any]] = []
        summaries = _run(_tasks(sources, out, chunk, skip_bad, counts, tasks), workers, out)
        hashed()
        atomic_write_text(plan_path, json.dumps(plan, indent=2))
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


def _tasks(
    sources: list[dict[str, Any]],
    out: Path,
    chunk: int,
    skip_bad: bool,
    counts: list[int],
    made: list[dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    """One task per chunk of each source, in order, each appended to ``made`` as it is yielded;
    ``counts`` gets each source's length once it is known."""
    for s, source in enumerate(sources):
        path = Path(source["path"])
        if source["kind"] == "extxyz":
            ranges: Iterator[tuple[int, int, Any]] = ((a, b, (x, y)) for a, b, x, y in _extxyz_chunks(path, chunk))
        else:
            total = _count(source["kind"], path, source["format"])
            ranges = ((a, min(total, a + chunk), None) for a in range(0, total, chunk))
        for start, stop, byte_range in ranges:
            task = {
                "path": str(path),
                "kind": source["kind"],
                "format": source["format"],
                "source": s,
                "start": start,
                "stop": stop,
                "skip_bad": skip_bad,
                "shard": str(out / f"shard-{len(made):05d}.h5"),
                "bytes": byte_range,
            }
            made.append(task)
            counts[s] = stop
            yield task
        if not counts[s]:
            raise DataError(f"{path}: no configurations in the file; give a file with at least one")


def _done(task: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a task whose shard an earlier, interrupted run finished."""
    shard = Path(task["shard"])
    sidecar = shard.with_suffix(".json")
    if shard.is_file() and sidecar.is_file():
        summary = json.loads(sidecar.read_text())
        if (summary.get("start"), summary.get("stop")) == (task["start"], task["stop"]):
            return summary
    return None


def _run(tasks: Iterator[dict[str, Any]], workers: int, out: Path) -> dict[int, dict[str, Any]]:
    """Convert every task not already converted; each task's summary, by task index."""
    summaries: dict[int, dict[str, Any]] = {}
    reused = 0
    if workers == 1:
        for k, task in enumerate(tasks):
            earlier = _done(task)
            if earlier is not None:
                summaries[k], reused = earlier, reused + 1
                continue
            summaries[k] = _convert_task(task)
            log.info("%s: converted shard %d", out, k)
    else:
        context = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            futures: dict[cf.Future, int] = {}
            try:
                for k, task in enumerate(tasks):
                    earlier = _done(task)
                    if earlier is not None:
                        summaries[k], reused = earlier, reused + 1
                    else:
                        futures[pool.submit(_convert_task, task)] = k
                for future in cf.as_completed(futures):
                    summaries[futures[future]] = future.result()
                    log.info("%s: converted shard %d", out, futures[future])
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    if reused:
        log.info("%s: %d shards already converted by an interrupted run, kept", out, reused)
    return summaries


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
    """One shard file, read with ``pread``: its datasets are contiguous and uncompressed, so rows
    ``start:stop`` of a dataset are one read of known bytes at a known offset (no per-read HDF5 call,
    about a microsecond). Nothing is mapped or cached, so a process that reads a million random
    configurations holds no more memory than one that reads ten (a memory map's fault-around would
    count 64 kB of neighbours per configuration touched). Text columns are read with h5py."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # name -> (byte offset in the file, dtype, shape, bytes per row)
        self.layout: dict[str, tuple[int | None, np.dtype, tuple[int, ...], int]] = {}
        with h5py.File(path, "r") as handle:

            def visit(name: str, item: Any) -> None:
                if isinstance(item, h5py.Dataset):
                    row = int(np.prod(item.shape[1:], dtype=np.int64)) * item.dtype.itemsize
                    self.layout[name] = (item.id.get_offset(), item.dtype, item.shape, row)

            handle.visititems(visit)
        missing = [name for name in SHARD_DATASETS if name not in self.layout]
        if missing:
            raise DataError(
                f"{path}: shard lacks {', '.join(missing)} (written by another mace_mf version); "
                "rebuild the store with this version's mace-mf preprocess"
            )
        self._fd: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def has(self, name: str) -> bool:
        return name in self.layout

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of dataset ``name`` (a fresh array)."""
        offset, dtype, shape, row = self.layout[name]
        if dtype.kind == "O" or offset is None:  # text, or an empty dataset (never allocated)
            with h5py.File(self.path, "r") as handle:
                data = handle[name][start:stop]
            if dtype.kind == "O":
                return np.array([v.decode() if isinstance(v, bytes) else v for v in data], dtype=object)
            return np.asarray(data)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, (stop - start) * row, offset + start * row)
        return np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:]))

    def row(self, name: str, index: int) -> np.ndarray:
        return self.rows(name, index, index + 1)[0]

    def column(self, name: str) -> np.ndarray:
        """The whole dataset ``name``."""
        return self.rows(name, 0, self.layout[name][2][0] if self.layout[name][2] else 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    """A store opened for reading. Shards are opened lazily, per process (a DataLoader worker that
    forks after the parent opened one opens its own), and only the rows asked for are read."""

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
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}}

    @property
    def sources(self) -> list[dict[str, Any]]:
        return self.manifest["sources"]

    @property
    def elements(self) -> list[int]:
        return self.manifest["elements"]

    def shard(self, index: int) -> _Shard:
        if os.getpid() != self._pid:  # forked: share no file offsets with the parent
            self._shards, self._pid = {}, os.getpid()
        shard = self._shards.pop(index, None)
        if shard is None:
            shard = _Shard(self.path / self.manifest["shards"][index]["file"])
        self._shards[index] = shard  # most recently used last
        if len(self._shards) > OPEN_SHARDS:
            self._shards[next(iter(self._shards))].close()  # its file descriptor; the layout stays
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

    def _atoms_of(self, shard: int, local: int) -> tuple[int, int]:
        """The atom rows ``[a, b)`` of a configuration within its shard."""
        a, b = self.shard(shard).rows("atom_start", local, local + 2)
        return int(a), int(b)

    def where(self, row: int) -> str:
        """``<source file>: configuration <index>`` of a store row, for error messages."""
        shard, local = self.locate(row)
        index = int(self.shard(shard).row("source_index", local))
        source = self.sources[self.manifest["shards"][shard]["source"]]
        return f"{source['path']}: configuration {index}"

    def record(self, row: int, info: Sequence[str] = (), arrays: Sequence[str] = ()) -> Record:
        """Geometry of ``row`` and its labels under the keys asked for (copies, safe to keep)."""
        index, local = self.locate(row)
        shard = self.shard(index)
        a, b = self._atoms_of(index, local)
        info_values: dict[str, Any] = {}
        for key in info:
            name = _escape(key)
            present = shard.has(f"info/{name}") and bool(shard.row(f"info_mask/{name}", local))
            info_values[key] = _scalar(shard.row(f"info/{name}", local)) if present else None
        array_values: dict[str, np.ndarray | None] = {}
        for key in arrays:
            name = _escape(key)
            present = shard.has(f"arrays/{name}") and bool(shard.row(f"arrays_mask/{name}", local))
            array_values[key] = shard.rows(f"arrays/{name}", a, b) if present else None
        return Record(
            shard.rows("numbers", a, b).astype(np.int64),
            shard.rows("positions", a, b),
            shard.row("cell", local),
            shard.row("pbc", local),
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
            numbers = self.shard(index).rows("numbers", *self._atoms_of(index, local))
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
            if _digest(path) != source["sha256"]:
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
    digest = _digest(path)
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
    digest = _content_hash(path, cache)
    key = f"{digest[:24]}-{kind}-{fmt or 'auto'}-v{STORE_FORMAT}"
    folder = cache / key
    if (folder / MANIFEST).is_file() and _readable(folder):
        return Store(folder)
    with _locked(cache / "locks" / f"{key}.lock"):
        if (folder / MANIFEST).is_file() and not _readable(folder):
            log.warning("%s: cached store unreadable by this mace_mf version; converting %s again", folder, path)
            shutil.rmtree(folder)
        if not (folder / MANIFEST).is_file():
            log.info("%s: converting to a store in %s (once; later runs reuse it)", path, folder)
            preprocess([path], folder, workers=workers, fmt=fmt, digests=[digest])
    return Store(folder)


def _readable(folder: Path) -> bool:
    """Whether a cached store opens and its first shard has this format's datasets (a cache written by
    a development version of the same format number may not); the cache is ours to rebuild."""
    try:
        store = Store(folder)
        if store.manifest["shards"]:
            store.shard(0)
        store.close()
    except DataError:
        return False
    return True


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
