"""User errors: bad input that deserves one clear line and a non-zero exit, not a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (files, config, flags). The message names what and expects what."""

    exit_code = 1


def main_guard(fn):
    """Wrap a launch script's main(): a UserError prints `error: <message>` and exits with its code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)

    return wrapper
