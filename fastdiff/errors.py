"""Errors a user can fix. The command line prints these as one line (exit code 2 for a
usage mistake, 1 for a bad file or data); any other exception is a bug and keeps its
traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (an option, a path, a value): printed without a traceback."""


class InputError(UserError, ValueError):
    """A file or data set the user supplied cannot be used (unreadable, malformed, inconsistent)."""
