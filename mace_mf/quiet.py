"""The exact warnings of mace-torch's dependencies that are noise to a mace_mf user, silenced where
they arise and nowhere else: every other warning still reaches the user."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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
