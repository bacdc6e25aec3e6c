"""Errors that reach the user as one line naming the file or field at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be trained on or written; the message names the file and the problem."""
