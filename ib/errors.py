"""Exceptions that the command line turns into a one-line message and exit status 2."""


class IBError(Exception):
    """Base class of errors caused by the user's input (recipe, arguments, files), not by a bug."""


class ConfigError(IBError, ValueError):
    """A recipe or argument is invalid: unknown key, wrong type, out-of-range value, unknown name."""


class DataError(IBError, FileNotFoundError):
    """A data set is missing or unreadable."""


class CheckpointError(IBError):
    """A checkpoint is missing, truncated or corrupted."""
