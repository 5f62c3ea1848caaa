"""User-facing errors.

Anything the user can fix (a bad path, a corrupt file, a wrong setting) raises `UserError` with
one line that names the file, line or field and says what to do. The CLI prints that line and
exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        full = message if fix is None else f"{message} ({fix})"
        super().__init__(full)
