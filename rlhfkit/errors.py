"""Errors that tell the user what is wrong and where, raised before expensive work."""

from __future__ import annotations


class RlhfkitError(Exception):
    """Base class: a user-facing error. The CLI prints it without a traceback."""


class ConfigError(RlhfkitError):
    """A config key is unknown, has the wrong type, is missing or conflicts with another."""


class DataError(RlhfkitError):
    """A data file or row is malformed. The message names the file, the line/row and the field."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        where = []
        if source:
            where.append(source)
        if field:
            where.append(f"field '{field}'")
        self.source = source
        self.field = field
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class RewardFunctionError(RlhfkitError):
    """A reward function failed or returned something unusable while scoring completions. The
    message names the function and, where it applies, the row and the offending value."""

    def __init__(self, message: str, *, function: str | None = None, row: int | None = None):
        self.function = function
        self.row = row
        super().__init__(message)
