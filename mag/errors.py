"""Errors a user can act on. The CLI prints their message alone (no traceback) and exits
non-zero."""


class MagError(Exception):
    """Base class: the message says what was expected, what was found, and what to do."""


class ConfigError(MagError, ValueError):
    """A config value or preset name is invalid."""


class CheckpointError(MagError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


class InputError(MagError, ValueError):
    """A tensor, file or argument has the wrong shape, type or content."""
