"""One exception family for every user-facing mistake.

Each message is one line that names the problem and the fix; the CLI prints it as
``error: <message>`` and exits with status 2 instead of a traceback.
"""


class UserError(ValueError):
    """A problem the user can fix (config, data, checkpoint, launch environment)."""


class ConfigError(UserError):
    """An invalid or inconsistent configuration value."""


class DataError(UserError):
    """Missing, empty or inconsistent training data."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


class LaunchError(UserError):
    """A launch environment that cannot work (hostfile, world size, master address)."""
