"""User-facing errors.

Anything a user can cause (a bad config key, a corrupt checkpoint, an empty corpus, a prompt that is too long)
raises :class:`TreeffnError`. The CLI prints its message on one line and exits non-zero without a traceback;
everything else is a bug and keeps its traceback.
"""


class TreeffnError(Exception):
    """An error caused by user input; its message names the problem in one line."""


class ConfigError(TreeffnError, ValueError):
    """An unknown configuration key or an impossible value."""


class CheckpointError(TreeffnError):
    """A missing, truncated, corrupt or mismatched checkpoint."""


class DataError(TreeffnError):
    """An empty, binary or undecodable corpus, or token ids out of range."""


class OutputError(TreeffnError):
    """An output folder a command must not write: its own input, or something other than what it writes."""
