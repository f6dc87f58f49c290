"""The one exception type that reaches the user as a clear one-line message.

Anything raised as `UserError` is printed by the CLI as ``error: <message>`` and the
process exits with code 2 — no traceback. Everything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class ConfigError(UserError):
    """An unknown, mistyped or out-of-range configuration value."""


class DataError(UserError):
    """A dataset that is missing, empty, unreadable or too small."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unsafe or of the wrong architecture."""
