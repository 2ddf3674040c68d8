"""How many CPU threads a run's torch gets when the recipe does not say (``num_threads: null``).

torch's own default is one thread per core whatever else runs, so two bench arms side by side, or
one run next to other work, oversubscribe the cores: measured on 2 cores at load 5.5, epochs of
3.2-19.2 s with torch's default against 1.2-1.4 s with one thread. The default here divides the
cores this process may use among the runs that share them (``--workers`` of a bench; torchrun's
processes on a node) and leaves out the cores that other processes already keep busy (the one-minute
load average when the run starts)."""

from __future__ import annotations

import os

RUNS_ENV = "MACE_MF_RUNS_AT_ONCE"  # set by `mace-mf bench --workers N` in each of its workers


def usable_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def default_threads() -> tuple[int, str]:
    """The thread count for this run, and why (for the log)."""
    cores = usable_cores()
    runs = max(1, int(os.environ.get(RUNS_ENV, "1"))) * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    load = os.getloadavg()[0]
    threads = max(1, min(cores // runs, cores - round(load)))
    return threads, f"{cores} usable cores, {runs} run(s) sharing them, load average {load:.1f}"
