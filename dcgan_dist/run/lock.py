"""One job per run_dir: a lock file that names its holder, with stale-lock detection.

Two jobs writing one run_dir (easy on shared storage) would interleave checkpoints and rotate each other's
away. Global rank 0 holds `run_dir/LOCK` (JSON: host, PID namespace, PID and start time of the holder) and
touches it every HEARTBEAT_S. A lock is stale, and taken over with a note, when its holder was in this
PID namespace and is gone (decided at once), or otherwise when it has had no heartbeat for STALE_AFTER_S:
a new job waits that long rather than refusing, since a job restarted right after a kill (Kubernetes,
Slurm requeue) is not a failure. A holder that stalls past that (a stopped process, a hung mount) finds
its lock taken and stops before its next save (`check`).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dcgan_dist.errors import RunStopped, UserError, note, warn
from dcgan_dist.host import process_start_ticks

HEARTBEAT_S = 15.0
STALE_AFTER_S = 90.0        # six missed heartbeats; generous for clock skew between NFS clients


def _pid_namespace() -> str:
    """Containers on one host (even with --network host, so the same hostname) have PID spaces of their
    own: a PID can only be checked by a process in the same one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _job_id() -> str:
    for var in ("SLURM_JOB_ID", "PBS_JOBID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(var) and os.environ[var] != "none":
            return f"{var.split('_')[0].lower()} {os.environ[var]}"
    return ""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_ns: str = ""
    start_ticks: int = -1
    job: str = ""
    since: str = ""

    @classmethod
    def me(cls) -> "Holder":
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, pid_ns=_pid_namespace(),
                   start_ticks=process_start_ticks(pid) or -1, job=_job_id(),
                   since=time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    @classmethod
    def parse(cls, text: str) -> "Holder":
        """A lock file's holder; fields this version does not know are ignored. ValueError, TypeError or
        KeyError if the text is not a complete lock."""
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def describe(self) -> str:
        job = f", {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.since or 'unknown'}"


def stale_reason(holder: Holder, heartbeat_age_s: float, me: Optional[Holder] = None) -> Optional[str]:
    """Why the lock `holder` left is stale, or None if its job may still be running."""
    me = me or Holder.me()
    if holder.host == me.host and holder.pid_ns == me.pid_ns:
        ticks = process_start_ticks(holder.pid)
        if ticks is None:
            return f"its process {holder.pid} is gone"
        if -1 not in (ticks, holder.start_ticks) and ticks != holder.start_ticks:
            return f"pid {holder.pid} now belongs to another process"
        return None
    if heartbeat_age_s > STALE_AFTER_S:
        return f"no heartbeat for {heartbeat_age_s:.0f} s"
    return None


class RunLock:
    """Held by global rank 0 from start to exit. `acquire` waits out a lock that may be stale and raises
    UserError if another job holds it; `check` raises RunStopped once another job has taken it over."""

    def __init__(self, path: Path, run_dir: str):
        self.path, self.run_dir = Path(path), run_dir
        self.me = Holder.me()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Take the lock. A holder on another machine or in another container whose heartbeat is recent
        may be a job that was just killed (a pod restarted in a new PID namespace) or one still running:
        wait, at most STALE_AFTER_S + 2 heartbeats, until it goes stale (take over) or beats again (refuse)."""
        torn = 0
        first_beat, deadline = None, time.monotonic() + STALE_AFTER_S + 2 * HEARTBEAT_S
        while True:
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
                self._thread.start()
                return
            found = self._read()
            if found is None:                   # released, or half-written by a starting job: look again
                torn += 1
                if torn > 20:
                    raise UserError(f"run_dir '{self.run_dir}': could not take '{self.path}'; another job keeps "
                                    "replacing it")
                time.sleep(0.25)
                continue
            holder, beat = found
            reason = stale_reason(holder, time.time() - beat, self.me)
            if reason is not None:
                note(f"taking over a stale lock on run_dir '{self.run_dir}' ({holder.describe()}): {reason}")
                self._discard(holder)
                continue
            local = holder.host == self.me.host and holder.pid_ns == self.me.pid_ns
            if local or (first_beat is not None and beat > first_beat) or time.monotonic() > deadline:
                raise UserError(f"run_dir '{self.run_dir}' is in use by a running job ({holder.describe()}); "
                                "stop that job or choose another run_dir")
            if first_beat is None:
                first_beat = beat
                note(f"run_dir '{self.run_dir}' is locked by {holder.describe()}, last heartbeat "
                     f"{time.time() - beat:.0f} s ago; waiting up to {STALE_AFTER_S - (time.time() - beat):.0f} s for "
                     "it to go stale (a job that was killed) or to beat again (a job still running)")
            time.sleep(min(1.0, HEARTBEAT_S / 4))

    def check(self) -> None:
        """Raise RunStopped if this job no longer holds the lock: it stalled past STALE_AFTER_S without a
        heartbeat, and another job took run_dir over. Saving now would write and rotate checkpoints
        beside that job's, so call this before every save."""
        found = self._read()
        if found is not None and found[0] == self.me:
            return
        who = found[0].describe() if found is not None else "no one (the lock file was removed)"
        raise RunStopped(f"this job lost the lock on run_dir '{self.run_dir}' (now held by {who}), after "
                         f"going more than {STALE_AFTER_S:.0f} s without a heartbeat; stopping without saving, so "
                         "that the two jobs do not write over each other's checkpoints")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        found = self._read()
        if found is not None and found[0] == self.me:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self.me)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> Optional[tuple[Holder, float]]:
        """(holder, time of its last heartbeat), or None if there is no complete lock file."""
        try:
            beat = self.path.stat().st_mtime
            return Holder.parse(self.path.read_text()), beat
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            if time.time() - beat > STALE_AFTER_S:      # garbage nobody is finishing: a stale lock of no one
                return Holder(host="?", pid=-1, since="unknown"), beat
            return None

    def _discard(self, holder: Holder) -> None:
        """Move the stale lock aside, and put it back if it turns out to be a new holder's."""
        aside = self.path.with_name(f".{self.path.name}.stale-{self.me.pid}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = Holder.parse(aside.read_text())
        except (OSError, ValueError, TypeError, KeyError):
            moved = holder
        if moved != holder and not self.path.exists():      # someone else took it over meanwhile
            os.replace(aside, self.path)
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        """Touch the lock while the job runs; stop touching once another job holds it (`check` then stops
        this one before its next save). Never raises: a storage hiccup must not stop training."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                found = self._read()
                if found is not None and found[0] != self.me:
                    warn(f"the lock on run_dir '{self.run_dir}' was taken by {found[0].describe()}; this job stops "
                         "before its next checkpoint")
                    return
                os.utime(self.path)
            except OSError:
                pass
