"""Run `accelerate launch ...` so that a stop by signal is a clean, resumable exit with a known code:

    python -m dcgan_dist.dist.supervise -- accelerate launch ... launch/train.py ARGS

docker/entrypoint.sh runs every training job through this (images, Slurm, Kubernetes). Left to itself,
torchrun forwards a SIGTERM to the ranks, SIGKILLs them 30 s later whether or not their checkpoint is
written, and exits 1: every restart policy would see a preemption as a crash. Here torchrun ignores
SIGTERM and SIGINT and this process forwards them to the ranks, which stop together at the next step
boundary with a checkpoint; the only deadline is the sender's grace period. The exit code says what
happened (docs/DEPLOY.md, "Exit codes"): 0 finished, or stopped by a signal with PREEMPTED_EXIT_CODE
unset; PREEMPTED_EXIT_CODE stopped by a signal or a lost machine (resume by restarting); 4 a lost
machine, PREEMPTED_EXIT_CODE unset; anything else a real failure, the first failing rank's own code,
which each rank writes under DCGAN_EXIT_REPORT_DIR (errors.report_exit) since torchrun reports 1.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from dcgan_dist.errors import EXIT_REPORT_ENV, PeerLost, UserError, main_guard
from dcgan_dist.host import children

FORWARDED = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.5


def _launcher_setup() -> None:
    """In the launcher, before exec: ignore what this process forwards, and die with this process."""
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


class Supervisor:
    def __init__(self, cmd: list[str], report_dir: Path):
        # torchrun's --signals-to-handle, read from its environment: SIGTERM and SIGINT left out.
        env = {**os.environ, EXIT_REPORT_ENV: str(report_dir), "PET_SIGNALS_TO_HANDLE": "SIGHUP,SIGQUIT"}
        self.requested: Optional[int] = None
        self.signalled: dict[int, int] = {}          # rank PID -> the last signal sent to it
        self.hung_up = False
        self.had_ranks = False                       # the launcher got past its rendezvous
        for sig in FORWARDED:
            signal.signal(sig, self._on_signal)
        self.launcher = subprocess.Popen(cmd, env=env, preexec_fn=_launcher_setup)

    def _on_signal(self, signum, frame) -> None:
        self.requested = signum
        self.signalled.clear()                       # a second signal is forwarded again (a second Ctrl-C kills)
        self._forward()

    def _forward(self) -> None:
        """Send the requested signal to every rank (the launcher's children) not yet sent it. Ranks that
        start after the signal get it when they appear. A launcher with no ranks yet (still in its
        rendezvous, which can wait many minutes for a machine that will never come) has nothing to
        checkpoint: it gets SIGHUP, which it does handle, and ends. One whose ranks have come and gone
        is exiting by itself: a SIGHUP then would only interrupt its exit with a SignalException."""
        ranks = children(self.launcher.pid)
        self.had_ranks = self.had_ranks or bool(ranks)
        if not ranks and not self.had_ranks and not self.hung_up:
            self.hung_up = True
            os.kill(self.launcher.pid, signal.SIGHUP)
        for pid in ranks:
            if self.signalled.get(pid) != self.requested:
                try:
                    os.kill(pid, self.requested)
                except ProcessLookupError:
                    continue
                self.signalled[pid] = self.requested

    def wait(self) -> int:
        while True:
            try:
                return self.launcher.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                if self.requested is not None:
                    self._forward()
                elif not self.had_ranks:
                    self.had_ranks = bool(children(self.launcher.pid))


def rank_codes(report_dir: Path) -> dict[str, int]:
    codes = {}
    for path in sorted(report_dir.glob("rank-*")):
        try:
            codes[path.name] = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return codes


def outcome(launcher_code: int, signalled: bool, codes: dict[str, int], preempted: Optional[int]) -> int:
    """The job's exit code, from the launcher's, whether a stop was asked, and the ranks' own codes."""
    if launcher_code == 0:
        return (preempted or 0) if signalled else 0
    failures = [c for c in codes.values() if c not in (0, PeerLost.exit_code)]
    if failures:
        return failures[0]
    if signalled:                    # ranks that died of the forwarded signal itself: nothing is lost
        return preempted or 0
    if PeerLost.exit_code in codes.values():
        return preempted or PeerLost.exit_code
    return launcher_code if launcher_code > 0 else 128 - launcher_code


def preempted_exit_code() -> Optional[int]:
    value = os.environ.get("PREEMPTED_EXIT_CODE", "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 255:
        raise UserError(f"PREEMPTED_EXIT_CODE={value!r}: expected an exit code from 1 to 255, or unset")
    return int(value)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m dcgan_dist.dist.supervise -- accelerate launch ... launch/train.py ARGS")
    preempted = preempted_exit_code()
    with tempfile.TemporaryDirectory(prefix="dcgan-exit-") as report_dir:
        supervisor = Supervisor(argv, Path(report_dir))
        launcher_code = supervisor.wait()
        codes = rank_codes(Path(report_dir))
    code = outcome(launcher_code, supervisor.requested is not None, codes, preempted)
    if supervisor.requested is not None:
        what = "resumable: run the same command again" if code in (0, preempted) else "failed"
        print(f"dcgan-dist: stopped by {signal.Signals(supervisor.requested).name}, exit {code} ({what})",
              file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main_guard(main)(sys.argv[1:]))
