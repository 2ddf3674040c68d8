"""The exact warnings of mace-torch's dependencies that are noise to a mace_mf user, silenced where
they arise and nowhere else: every other warning still reaches the user."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

# What TorchScript says of every e3nn layer it scripts (e3nn's code generation, on building a
# readout and on compiling a model): harmless for these classes, and noise in a user's log.
TORCHSCRIPT_ANNOTATION_WARNING = r"The TorchScript type system doesn't support instance-level annotations"


@contextmanager
def torchscript_quiet() -> Iterator[None]:
    """Silence exactly TorchScript's instance-level-annotation ``UserWarning`` inside the block;
    every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_ANNOTATION_WARNING, category=UserWarning)
        yield


# mace-torch prints this (to stdout, at import) wherever cuequivariance is not installed, though
# nothing of mace_mf uses it unless `training.cueq` is asked for (which then says what to install).
CUEQ_NOT_INSTALLED = (
    "cuequivariance or cuequivariance_torch is not available. Cuequivariance acceleration will be disabled."
)
# e3nn warns about the environment variable that mace itself sets on import.
E3NN_WEIGHTS_ONLY = "Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# wandb, on every `run.save` (the recipe, the report, metrics) and at an offline run's start: advice that
# contradicts the recipe's own `wandb.mode`; mace_mf says how to sync an offline run itself.
WANDB_NOISE = ("into the W&B run directory", "WANDB_MODE=online")


class _Dropping(io.TextIOBase):
    """A text stream that passes every line through except those containing one of ``fragments``."""

    def __init__(self, stream: TextIO, fragments: tuple[str, ...]) -> None:
        self.stream, self.fragments, self.pending = stream, fragments, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not any(f in line for f in self.fragments):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not any(f in self.pending for f in self.fragments):
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding


@contextmanager
def dropped_lines(stream: str, *fragments: str) -> Iterator[None]:
    """Drop the lines of ``sys.stdout`` or ``sys.stderr`` that contain one of ``fragments`` inside the
    block (what a library prints itself, which no warning filter reaches); the rest passes unchanged."""
    original = getattr(sys, stream)
    wrapped = _Dropping(original, fragments)
    setattr(sys, stream, wrapped)
    try:
        yield
    finally:
        wrapped.flush()
        setattr(sys, stream, original)


def silence_known_noise() -> None:
    """For a whole process (the CLI, a bench or labelling worker): e3nn's warning filtered, mace's
    cuequivariance notice dropped from stdout. Everything else still reaches the user."""
    warnings.filterwarnings("ignore", message=E3NN_WEIGHTS_ONLY)
    if not isinstance(sys.stdout, _Dropping):
        sys.stdout = _Dropping(sys.stdout, (CUEQ_NOT_INSTALLED,))
