"""Errors that deserve one clear line and a non-zero exit, and the one channel for every warning, note and
error line: `warn`, `note` and, for errors, `main_guard`. Each line is said once: by global rank 0, or by
the rank whose own news it is (`mine`), or once per machine (`PeerLost`)."""
from __future__ import annotations

import functools
import os
import sys
import tempfile

from dcgan_dist.host import process_start_ticks


class UserError(Exception):
    """A problem with the user's input (files, config, flags). The message names what and expects what."""

    exit_code = 1


class RunStopped(UserError):
    """Training cannot go on (non-finite losses, unreadable data); the last good checkpoint is kept."""

    exit_code = 3


class PeerLost(RunStopped):
    """Another rank or machine of the job died. Each machine says so once: rank 0 may be the one that
    died, and each machine's log should tell its reader why its ranks stopped."""

    exit_code = 4
    every_node = True


MARKER_PREFIX = "dcgan-dist-stopped-"
EXIT_REPORT_ENV = "DCGAN_EXIT_REPORT_DIR"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(kind: str, message: str, mine: bool = False) -> None:
    """`kind: message` as one line on stderr, flushed at once (a rank may die right after). Global rank 0
    says it, unless it is `mine`: this rank's own news (its shards, its signal), which any rank says,
    naming itself when the job has several. Through tqdm, so a progress bar is redrawn below it."""
    if mine or rank() == 0:
        who = f"[rank {rank()}] " if mine and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        _write(f"{kind}: {who}{message}")


def _write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def warn(message: str, mine: bool = False) -> None:
    say("warning", message, mine)


def note(message: str, mine: bool = False) -> None:
    say("note", message, mine)


def report_exit(code: int) -> None:
    """Tell the supervisor (dist/supervise.py) this rank's exit code: torchrun reports 1 for any failed
    rank, and the job's exit code depends on why it failed. A no-op when nobody asks."""
    folder = os.environ.get(EXIT_REPORT_ENV)
    if not folder:
        return
    path = os.path.join(folder, f"rank-{rank()}")
    try:
        with open(path + ".tmp", "w") as f:
            f.write(f"{code}\n")
        os.replace(path + ".tmp", path)
    except OSError:
        pass                        # the supervisor then falls back to the launcher's code


def _first_on_this_machine() -> bool:
    """True for the first rank of this machine to ask, per launch. The launcher kills the other ranks
    as soon as one exits, so waiting for local rank 0 to speak could lose the line; the ranks of one
    launcher share its PID, so an exclusively created file named after it picks one of them. The name
    carries the launcher's start time too: a PID comes back, and a stale file must not silence a later job."""
    launcher = os.getppid()
    name = f"{MARKER_PREFIX}{launcher}-{process_start_ticks(launcher)}-{os.environ.get('MASTER_PORT', '')}"
    marker = os.path.join(tempfile.gettempdir(), name)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except OSError:
        return os.environ.get("LOCAL_RANK", "0") == "0"
    _sweep_markers(os.path.dirname(marker))
    return True


def _sweep_markers(folder: str) -> None:
    """Remove the markers of launchers that are gone, so failed jobs do not pile files up in /tmp."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(MARKER_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(MARKER_PREFIX):].split("-", 1)[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        except (ValueError, OSError):        # not ours to judge (malformed), or alive under another user
            pass


def main_guard(fn):
    """Wrap a launch script's main(): a UserError prints `error: <message>` once and exits with its code.
    Under a multi-rank launch every rank usually hits the same error; global rank 0 says it (each
    machine's first rank to fail, for errors marked `every_node`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        code = 1                                  # what an uncaught exception exits with
        try:
            result = fn(*args, **kwargs)
            code = 0
            return result
        except UserError as exc:
            message, code, every_node = str(exc), exc.exit_code, getattr(exc, "every_node", False)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            raise
        finally:
            report_exit(code)
        # Exit outside the except block: the traceback (and any loader workers its frames hold) is freed
        # first, so interpreter shutdown never waits on a worker that nobody will stop.
        if not every_node:
            say("error", message)
        elif _first_on_this_machine():              # once per machine, by whichever rank asks first
            _write(f"error: {message}")
        sys.exit(code)

    return wrapper
