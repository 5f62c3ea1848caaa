"""User-facing errors, and the interruption a training stage ends with.

Anything the user can fix (a bad path, a corrupt file, a wrong setting) raises `UserError` with
one line that names the file, line or field and says what to do. The CLI prints that line and
exits with status 2; it never shows a traceback for these.

`Interrupted` is not an error: a training loop that caught SIGTERM or Ctrl-C saves a checkpoint
and raises it, so the stage stops right there (no evaluation, no report) and the CLI exits with
the signal convention's status (128 + the signal number: 143 for SIGTERM, 130 for SIGINT), which
tells a scheduler the job did not finish.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        full = message if fix is None else f"{message} ({fix})"
        super().__init__(full)


class Interrupted(Exception):
    """A training stage stopped on a signal after saving its checkpoint at `step`."""

    def __init__(self, signal_name: str, step: int) -> None:
        self.signal_name, self.step = signal_name, step
        super().__init__(f"{signal_name}: saved a checkpoint at step {step}; continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + int(signal.Signals[self.signal_name])
