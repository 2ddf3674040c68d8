"""Read an offline W&B run file (``run-<id>.wandb``) back with wandb's own reader, for tests.

``wandb leet inspect --json FILE`` (wandb-core, shipped with the wandb package) prints one JSON
object per record: ``{"num": n, "type": "run" | "history" | "summary" | "files" | "artifact" |
..., "<type>": {...}}``. Nested metric keys are joined with ``.`` (``plots/x.path``) and values are
decoded JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of ``path``, in file order, as wandb-core decodes it."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"wandb leet inspect {path} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def of_type(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The bodies of the records of one type (``run``, ``history``, ``summary``, ...)."""
    return [record[kind] for record in records if record["type"] == kind]


def history_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [h["item"] for h in of_type(records, "history")]


def summary_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's summary as the last update of each key left it."""
    summary: dict[str, Any] = {}
    for update in of_type(records, "summary"):
        summary.update(update.get("update", {}))
    return summary


def run_config(run: dict[str, Any]) -> dict[str, Any]:
    return run["config"]["update"]
