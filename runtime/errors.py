"""User-facing errors.

A :class:`BckdError` is a mistake the user can fix (bad input file, wrong size, existing output).
The CLI prints its message as one line and exits with status 1; any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations


class BckdError(Exception):
    """A user error: one clear line saying what was wrong and what to do."""
