"""How many CPU threads a run's torch gets when the recipe does not say (``num_threads: null``).

torch's own default is one thread per core whatever else runs, so two bench arms side by side, or
one run next to other work, oversubscribe the cores: measured on 2 cores at load 5.5, epochs of
3.2-19.2 s with torch's default against 1.2-1.4 s with one thread. The default here divides the
cores this process may use among the runs that share them (``--workers`` of a bench; torchrun's
processes on a node) and leaves out the cores that other processes keep busy *now*.

"Now" is the number of runnable tasks the kernel reports (``/proc/loadavg``'s fourth field), the
median of a few samples, less this process. The one-minute load average is not used where that
count exists: it still carries the work that just finished (a previous bench arm, the data
preprocessing), and on 2 quiet cores it gave a run one thread (docs/performance.md, "Threads")."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

RUNS_ENV = "MACE_MF_RUNS_AT_ONCE"  # set by `mace-mf bench --workers N` in each of its workers
PROC_LOADAVG = Path("/proc/loadavg")
SAMPLES = 10
SAMPLE_INTERVAL_S = 0.02


def usable_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def busy_cores() -> tuple[float, str]:
    """Cores that other processes keep busy, and what the figure is (for the log)."""
    try:
        samples = []
        for i in range(SAMPLES):
            running = PROC_LOADAVG.read_text().split()[3].split("/")[0]
            samples.append(max(0, int(running) - 1))  # this process is one of the runnable tasks
            if i + 1 < SAMPLES:
                time.sleep(SAMPLE_INTERVAL_S)
        return statistics.median(samples), "other runnable tasks"
    except (OSError, IndexError, ValueError):
        return os.getloadavg()[0], "load average"


def default_threads() -> tuple[int, str]:
    """The thread count for this run, and why (for the log)."""
    cores = usable_cores()
    runs = max(1, int(os.environ.get(RUNS_ENV, "1"))) * max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    busy, what = busy_cores()
    threads = max(1, min(cores // runs, cores - round(busy)))
    return threads, f"{cores} usable cores, {runs} run(s) sharing them, {what} {busy:.1f}"
