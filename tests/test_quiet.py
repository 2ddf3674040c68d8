"""Exactly the known noise is silenced, and nothing else: mace's cuequivariance notice, e3nn's
weights-only warning, wandb's save and go-online lines."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

from support import ROOT

from mace_mf.quiet import CUEQ_NOT_INSTALLED, E3NN_WEIGHTS_ONLY, WANDB_NOISE, _Dropping, dropped_lines


def test_dropping_removes_only_the_named_lines():
    sink = io.StringIO()
    stream = _Dropping(sink, (CUEQ_NOT_INSTALLED,))
    stream.write("before\n" + CUEQ_NOT_INSTALLED + "\nafter, no newline yet")
    stream.write(" ... now\n")
    stream.flush()
    assert sink.getvalue() == "before\nafter, no newline yet ... now\n"


def test_wandb_lines_are_dropped_inside_the_block_and_everything_else_passes(capsys):
    with dropped_lines("stderr", *WANDB_NOISE):
        print("wandb: WARNING Symlinked 1 file into the W&B run directory; call wandb.save again", file=sys.stderr)
        print("wandb: W&B syncing is set to `offline`. Run `wandb online` or set WANDB_MODE=online", file=sys.stderr)
        print("wandb: a message a user needs", file=sys.stderr)
    print("outside the block: Symlinked 1 file into the W&B run directory", file=sys.stderr)
    err = capsys.readouterr().err.splitlines()
    assert err == ["wandb: a message a user needs", "outside the block: Symlinked 1 file into the W&B run directory"]


def test_the_cli_prints_neither_e3nn_nor_mace_noise(tmp_path, tiny_model_file, two_fidelity_files):
    """A command that loads mace and a model: its stdout and stderr hold no known noise."""
    command = [sys.executable, "-m", "mace_mf.cli", "eval", str(tiny_model_file), str(two_fidelity_files["test"]),
               "--energy-key", "hi_energy", "--forces-key", "hi_forces"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    assert E3NN_WEIGHTS_ONLY not in result.stderr and CUEQ_NOT_INSTALLED not in result.stdout
    assert "E RMSE (meV/atom)" in result.stdout  # the table, whole (not cut at 80 columns)
    with warnings.catch_warnings(record=True) as caught:  # the filter is the CLI's, not a global one
        warnings.simplefilter("always")
        warnings.warn(E3NN_WEIGHTS_ONLY + " (a test)", UserWarning, stacklevel=1)
    assert caught
