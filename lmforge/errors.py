"""User-facing errors: each is one line that names the key, file or record and what to do.

Entry points catch `LmforgeError`, print `error: <message>` to stderr and exit non-zero; any other
exception is a bug in lmforge and keeps its traceback.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """An error the user can fix: a bad config value, data file, path or checkpoint."""

    exit_code = 2


class ConfigError(LmforgeError):
    """A config key is unknown, has the wrong type, or holds a value that cannot work."""


class DataError(LmforgeError):
    """A data file or record cannot be read or does not have the expected fields."""


class CheckpointError(LmforgeError):
    """A checkpoint directory is missing files, corrupt, or does not match its config."""
