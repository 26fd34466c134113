"""The one exception type the CLI turns into a clear message and a non-zero exit."""

from __future__ import annotations


class QfmError(Exception):
    """A user-facing error: says what is wrong (file, row, parameter) and what to do."""


class DataError(QfmError):
    """Bad input data: a missing or unreadable file, a bad score, a bad layout."""


class ConfigError(QfmError):
    """A bad parameter or option value."""
