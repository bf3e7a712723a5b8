"""Fault injection for the tests: the product is patched from outside, then launch/train.py runs as a user
runs it. Nothing in the product reads these variables; run this script in its place:

    accelerate launch ... tests/scripts/faults.py --config FILE key=value ...

    DCGAN_FAULT_OVERFLOW=STEP[,STEP...]  the backward passes of those steps (1-based, as logged) see infinite
                                         gradients, as an fp16 overflow makes them; the logged loss stays finite
    DCGAN_FAULT_SLOW_SAVE=STEP:SECONDS   every rank holds the save of STEP half done, after writing its random state
    DCGAN_FAULT_ENOSPC=STEP              rank 0's write of STEP fails as a full disk does, half-way through
"""
import errno
import os
import runpy
import sys
import time
from pathlib import Path

import torch


class _InfiniteGradient(torch.autograd.Function):
    """The loss as it is going forward; its gradient times `scale` (1, or inf on a faulty step) going back."""

    @staticmethod
    def forward(ctx, loss, scale):
        ctx.save_for_backward(scale)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def force_overflow(patch, steps: set[int]) -> None:
    """From now on, every loss of the registry sends infinite gradients back on `steps`. `patch` is
    pytest's monkeypatch, or `Patch` below. A device tensor set before each step, so that a CUDA graph
    replays the fault too."""
    from dcgan_dist.nets import losses
    from dcgan_dist.train.step import TrainStep

    scale = {}
    call = TrainStep.__call__

    def faulty_call(self, batch_u8, step, images_seen):
        flag = scale.setdefault("flag", torch.ones((), device=self.real_u8.device))
        flag.fill_(float("inf") if step + 1 in steps else 1.0)
        return call(self, batch_u8, step, images_seen)

    patch.setattr(TrainStep, "__call__", faulty_call)
    for name, loss in list(losses.LOSSES.items()):
        d = lambda real, fake, target=1.0, loss=loss: _InfiniteGradient.apply(loss.d(real, fake, target), scale["flag"])
        g = lambda fake, loss=loss: _InfiniteGradient.apply(loss.g(fake), scale["flag"])
        patch.setitem(losses.LOSSES, name, losses.Loss(d, g, loss.smoothable, loss.d_output))


def fault_saves(patch, step: int, hold_s: float = 0.0, enospc: bool = False) -> None:
    """The save of `step`: held `hold_s` after each rank wrote its random state; with `enospc`, rank 0's
    write of the trainer state fails as a full disk does."""
    from dcgan_dist.run import checkpoint
    from dcgan_dist.run.layout import STATE_FILE

    write = checkpoint.atomic_write_text
    folder = f".tmp-step-{step:08d}"

    def faulty_write(path, text):
        path = Path(path)
        if enospc and path.parent.name == folder and path.name == STATE_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, text)
        if hold_s and path.parent.name == folder and path.name.startswith("rng-"):
            time.sleep(hold_s)

    patch.setattr(checkpoint, "atomic_write_text", faulty_write)


class Patch:
    setattr = staticmethod(setattr)
    setitem = staticmethod(dict.__setitem__)


if __name__ == "__main__":
    if os.environ.get("DCGAN_FAULT_OVERFLOW"):
        force_overflow(Patch, {int(s) for s in os.environ["DCGAN_FAULT_OVERFLOW"].split(",")})
    if os.environ.get("DCGAN_FAULT_SLOW_SAVE"):
        step, seconds = os.environ["DCGAN_FAULT_SLOW_SAVE"].split(":")
        fault_saves(Patch, int(step), hold_s=float(seconds))
    if os.environ.get("DCGAN_FAULT_ENOSPC") and os.environ.get("RANK", "0") == "0":
        fault_saves(Patch, int(os.environ["DCGAN_FAULT_ENOSPC"]), enospc=True)
    train = Path(__file__).resolve().parents[2] / "launch/train.py"
    sys.argv = [str(train), *sys.argv[1:]]
    runpy.run_path(str(train), run_name="__main__")
