"""Errors that reach the user as one line naming the file or field at fault.

Every command catches `UserError` and prints `jumprelu: error: <message>`, with the error's
`exit_status` (2 unless the class says otherwise).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

PREFIX = "jumprelu: error:"
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # training stopped at a non-finite loss or state; the good checkpoints are kept
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; run it again to resume


_ctrl_c_seen = False


def raise_on_ctrl_c(signum, frame) -> None:
    """SIGINT handler for the commands: Python's own (raise KeyboardInterrupt), remembering it too.

    A KeyboardInterrupt raised while one of jax's gc callbacks runs is dropped by Python
    ("Exception ignored in: <function _xla_gc_callback>") and the command went on as if Ctrl-C
    had not been pressed; `stop_on_dropped_ctrl_c` lets the next point that can stop cleanly (the training
    loop's entry, each harvest batch) stop then."""
    global _ctrl_c_seen
    _ctrl_c_seen = True
    raise KeyboardInterrupt


def catch_ctrl_c() -> None:
    """Install `raise_on_ctrl_c` (only the main thread may install handlers), and leave out of
    stderr Python's report of the KeyboardInterrupt it dropped ("Exception ignored in ...", a
    traceback before the command's one line): `stop_on_dropped_ctrl_c` acts on it."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, raise_on_ctrl_c)
        previous = sys.unraisablehook

        def unraisable(report) -> None:
            if _ctrl_c_seen and report.exc_type is not None and issubclass(report.exc_type, KeyboardInterrupt):
                return
            previous(report)

        sys.unraisablehook = unraisable


def stop_on_dropped_ctrl_c() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that `raise_on_ctrl_c` saw and Python dropped; call it
    where a command can stop cleanly (a Ctrl-C that was not dropped never gets that far)."""
    if _ctrl_c_seen:
        raise KeyboardInterrupt


class UserError(ValueError):
    """Input that cannot be used; the message names the file or field and what was expected."""

    exit_status = EXIT_USER_ERROR


class ConfigError(UserError):
    """A config value that cannot be trained with; the message names the field."""


class DataError(UserError):
    """Data that cannot be trained on or written; the message names the file and the problem."""


class WorkdirError(UserError):
    """A workdir that cannot be used: not a directory, not writable, or held by another run."""


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read; the message names the step and directory."""


class Diverged(UserError):
    """Training reached a non-finite loss or state; the message names the step and the last good checkpoint."""

    exit_status = EXIT_DIVERGED


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands, with their one error line: `jumprelu: error: PROG: message`
    and exit status 2 (argparse's own prints its usage block first, under its own prefix)."""

    def error(self, message):
        print(f"{PREFIX} {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
