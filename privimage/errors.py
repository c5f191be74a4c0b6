"""Errors that privimage reports to the user as one clear line.

Anything raised as a :class:`PrivImageError` is caught by the CLI, printed as
``error: <message>`` and ends the process with exit code 2, so messages must name
the bad value and say how to fix it.
"""


class PrivImageError(Exception):
    """Base class for errors with a user-facing message."""


class ConfigError(PrivImageError):
    """A configuration value is invalid (unknown dataset, epsilon <= 0, ...)."""


class DataError(PrivImageError):
    """A dataset cannot be found or read."""


class PrivacyBudgetError(PrivImageError):
    """A mechanism would spend more privacy than the run's target allows."""
