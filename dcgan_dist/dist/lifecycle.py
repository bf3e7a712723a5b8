"""A job's life on each rank: signals and the stop flag, lost peers, the launcher's death, shutdown."""
from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Optional

import torch
from accelerate import Accelerator

from dcgan_dist.dist.collectives import barrier, forget_startup_group
from dcgan_dist.errors import PeerLost, note


# What gloo and NCCL say when the process at the other end of a collective is gone, or never answered.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited", "Socket Timeout")
_TIMED_OUT = ("Timed out waiting", "timed out", "Watchdog caught collective operation timeout", "wait timeout")


def peer_lost(accelerator: Accelerator, exc: BaseException, timeout_s: Optional[float] = None) -> Optional[PeerLost]:
    """A one-line PeerLost for an error that means another rank or machine died or stopped answering
    (a collective that timed out), else None."""
    text = str(exc)
    signs = _PEER_LOST + _TIMED_OUT
    if accelerator.num_processes == 1 or not any(s in text for s in signs):
        return None
    detail = next((line.strip() for line in text.splitlines() if any(s in line for s in signs)), "")
    detail = detail.split("] ", 1)[-1].split(". ")[0][:160]
    if not any(s in text for s in _PEER_LOST) and timeout_s is not None:
        detail += f"; no answer within train.collective_timeout_s={timeout_s:g}"
    return PeerLost(f"lost contact with another rank of this {accelerator.num_processes}-rank job ({detail}): a "
                    "process or machine died or hangs; rerun the same command on every machine to resume")


def shutdown(accelerator: Accelerator, clean: bool = True) -> None:
    """Take the process group down, after the caller dropped every reference to DDP's wrappers: a gloo
    job whose wrapped models are still alive at exit aborts in about 4 runs of 10 ("terminate called
    without an active exception").

    After an error (`clean=False`) skip the barrier and leave the process group alone: the other ranks
    may be stuck in a collective, or stopped, and destroying a group with a peer that does not answer
    blocks for ever (seen with gloo and a SIGSTOPped peer). Exiting at once lets torchrun notice and
    stop them.
    """
    gc.collect()
    if clean:
        barrier(accelerator)
    accelerator.free_memory()
    if clean and torch.distributed.is_available() and torch.distributed.is_initialized():
        forget_startup_group()
        torch.distributed.destroy_process_group()


def _sigterm_when_launcher_dies() -> None:
    """torchrun starts every rank in a session of its own, so `kill -9` of the launcher (or the OOM
    killer taking it) would leave the ranks training on as orphans, still writing to run_dir. Ask Linux
    for a SIGTERM when the launcher dies: the ranks then stop together with a checkpoint, as for any
    SIGTERM. Only under torchrun: a plain `nohup python launch/train.py &` must outlive its shell."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != launcher:      # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class StopRequest:
    """SIGTERM/SIGINT on any rank -> every rank stops at the same step boundary.

    The handler only sets a flag. Ranks agree on it with a tiny all-reduce on a CPU (gloo) group, issued
    asynchronously at one step boundary and read at the next, so it never waits on the GPU or the
    network inside a step. All ranks therefore see the same answer at the same step. A second Ctrl-C
    kills at once; repeated SIGTERMs do not, because schedulers and launchers often send several (scancel
    signals every process of a job, torchrun forwards its own, and a launcher's death sends one more).
    """

    def __init__(self, accelerator: Accelerator):
        self.requested: Optional[int] = None
        self.world = accelerator.num_processes
        self.group = torch.distributed.new_group(backend="gloo") if self.world > 1 else None
        self.pending = None
        self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        _sigterm_when_launcher_dies()

    def _handler(self, signum, frame) -> None:
        if self.requested == signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = signum
        note(f"got {signal.Signals(signum).name}: stopping at the next step boundary with a checkpoint", mine=True)

    def poll(self) -> bool:
        """Call once per step on every rank. True means: all ranks stop now."""
        if self.group is None:
            return self.requested is not None
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([0 if self.requested is None else 1], dtype=torch.int32)
        self.pending = (torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=self.group,
                                                     async_op=True), flag)
        return stop

    def close(self, wait: bool = True) -> None:
        """Restore the signal handlers. After an error (`wait=False`) don't wait on the in-flight flag
        all-reduce: a dead peer would hold this rank until the collective timeout."""
        if self.pending is not None and wait:
            self.pending[0].wait()
        self.pending = None
        for s, handler in self.previous.items():
            signal.signal(s, handler)
