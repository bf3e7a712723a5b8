"""Errors that deserve one clear line and a non-zero exit, not a traceback."""
from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """A problem with the user's input (files, config, flags). The message names what and expects what."""

    exit_code = 1


class RunStopped(UserError):
    """Training cannot go on (non-finite losses, unreadable data); the last good checkpoint is kept."""

    exit_code = 3


def main_guard(fn):
    """Wrap a launch script's main(): a UserError prints `error: <message>` once and exits with its code.

    Under a multi-rank launch every rank usually hits the same error; only global rank 0 prints it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            message, code = str(exc), exc.exit_code
        # Exit outside the except block: the traceback (and any loader workers its frames hold) is freed
        # first, so interpreter shutdown never waits on a worker that nobody will stop.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(code)

    return wrapper
