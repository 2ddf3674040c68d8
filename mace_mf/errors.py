"""Errors that are the user's to fix.

Every such error carries one line that names the file, key or configuration at fault and the fix.
The CLI prints that line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""


class RecipeError(UserError):
    """The recipe file or a ``--set`` override is invalid."""


class DataError(UserError):
    """A data file cannot be read or carries invalid labels."""


class FoundationError(UserError):
    """The foundation model cannot be obtained or does not fit the data."""


class RunError(UserError):
    """The output folder or a checkpoint is not usable as asked."""


class LabelError(UserError):
    """A labelling request (calculator spec, input, output or cache) cannot be carried out."""
