"""The installed mace_mf's version, read from the package metadata (pyproject.toml is its source)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _installed() -> str:
    try:
        return version("mace-mf")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _installed()


def versions() -> dict[str, str]:
    """What wrote a file: mace_mf, mace-torch and torch versions (recorded in run.json, checkpoints
    and the exported files' metadata)."""
    import torch

    try:
        mace_torch = version("mace-torch")
    except PackageNotFoundError:
        mace_torch = "unknown"
    return {"mace_mf": __version__, "mace_torch": mace_torch, "torch": torch.__version__}
