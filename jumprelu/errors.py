"""Errors that reach the user as one line naming the file or field at fault.

Every command catches `UserError` and prints `jumprelu: error: <message>`, exit status 2.
"""

from __future__ import annotations

PREFIX = "jumprelu: error:"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Input that cannot be used; the message names the file or field and what was expected."""


class ConfigError(UserError):
    """A config value that cannot be trained with; the message names the field."""


class DataError(UserError):
    """Data that cannot be trained on or written; the message names the file and the problem."""
