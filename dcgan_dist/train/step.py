"""One training step, D then G, that never waits for the host; and the same step replayed as a CUDA graph.

Losses, skip counts and the first bad step accumulate in device tensors (`Totals`) that the loop reads at
log steps only. Nothing in a step calls `.item()`, so the whole step can be captured once with
`torch.cuda.graph` and replayed: at 64 px a step is a few hundred small kernels, and launching them one
by one from Python costs more than running them (docs/PERFORMANCE.md).

Why a hand-written capture rather than `torch.compile(mode="reduce-overhead")`: with BatchNorm under DDP
that skips cudagraphs or re-records every step (pytorch#139207, #140395), and DDP's `static_graph=True`
fails when D runs forward twice before one backward (pytorch#58111). Capturing by hand avoids both.
"""
from __future__ import annotations

import contextlib
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from dcgan_dist import faults, losses
from dcgan_dist.ops import amp
from dcgan_dist.augment import diff_augment
from dcgan_dist.ema import EMA

NO_STEP = 2**62                     # "no such step yet" in the device-side step markers

# Adam warns on every eager step of a capturable instance; ours runs eagerly only for the warm-up.
warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")


@dataclass
class Nets:
    """G and D as prepared (DDP-wrapped on several ranks), the bare modules, and the inner torch
    optimizers, unwrapped once: Accelerate's wrappers cost about 0.3 ms of Python per step (uncached
    look-ups and `inspect.signature` on every call, read in accelerate 1.15), which is 7-9% of a step at
    200+ steps/s."""

    G: nn.Module
    D: nn.Module
    G_local: nn.Module
    D_local: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: Optional[EMA] = None        # the EMA of G_local: what samples, metrics and exports use

    def clear(self) -> None:
        """Drop every reference, so DDP's wrappers can be freed before the process group goes
        (a gloo job whose wrapped models live on at exit aborts in about 4 runs of 10)."""
        self.__dict__.clear()


@dataclass(frozen=True)
class Remedies:
    """What D sees and aims for, beyond the paper (config section `gan`); the defaults are the paper."""

    loss: str = "bce"                      # a name in losses.LOSSES
    diffaugment: tuple[str, ...] = ()      # DiffAugment ops, applied to reals and fakes alike
    real_target: float = 1.0               # 1 - one-sided label smoothing
    instance_noise: float = 0.0            # std at the start, in [-1, 1] pixel units
    instance_noise_kimg: float = 0.0       # annealed linearly to zero over this many kimg

    def noise_std(self, images_seen: float) -> float:
        if self.instance_noise <= 0 or images_seen >= self.instance_noise_kimg * 1000:
            return 0.0
        return self.instance_noise * (1.0 - images_seen / (self.instance_noise_kimg * 1000))


class Totals:
    """Device-side running totals. `stats` (sums of loss_d, loss_g, D(x), D(G(z))) covers the current
    log interval; `skipped` ([D, G] updates skipped) the whole run. `first_bad` is the first step with a
    non-finite loss, `gave_up` the step at which `max_consecutive_skips` was reached; NO_STEP if none.
    Every update is in place, so a captured graph keeps writing to these same tensors."""

    def __init__(self, device: torch.device, step: int, skipped: tuple[int, int] = (0, 0)):
        long = dict(dtype=torch.int64, device=device)
        self.stats = torch.zeros(4, device=device)
        self.step = torch.tensor(step, **long)
        self.skipped = torch.tensor(skipped, **long)
        self.consecutive = torch.zeros((), **long)
        self.first_bad = torch.tensor(NO_STEP, **long)
        self.gave_up = torch.tensor(NO_STEP, **long)

    def read(self) -> dict:
        """One host sync: everything the log line needs."""
        ints = torch.stack([self.skipped[0], self.skipped[1], self.first_bad, self.gave_up]).tolist()
        return {"stats": self.stats.tolist(), "skipped_d": ints[0], "skipped_g": ints[1],
                "first_bad": ints[2], "gave_up": ints[3]}


@dataclass(frozen=True)
class Progress:
    """Real images seen, all ranks together, after a given step. Carried, not derived: a run resumed on
    another number of ranks adds its own global batch to what the checkpoint had seen, so kimg never
    jumps across a restart (step x today's batch would)."""

    start_step: int                  # the step the run (re)started at
    start_images: int                # images seen by then, from the checkpoint
    global_batch: int                # images per step from then on

    def images(self, done: int) -> int:
        return self.start_images + (done - self.start_step) * self.global_batch

    def kimg(self, done: int) -> float:
        return self.images(done) / 1000


class TrainStep:
    """D step then G step on a uint8 batch already on the device, updating `totals`.

    `scaler` is the fp16 GradScaler (None otherwise). `guard` skips any update whose gradients are not
    finite (train.nonfinite=skip); both decide on the device, through fused Adam's `found_inf`, so the
    host never waits. Every rank decides alike because the gradients are all-reduced by then.
    """

    def __init__(self, nets: Nets, totals: Totals, autocast: Callable[[], AbstractContextManager],
                 scaler: Optional[torch.amp.GradScaler], guard: bool, max_consecutive_skips: int,
                 remedies: Remedies = Remedies(), ema: Optional[EMA] = None, progress: Optional[Progress] = None):
        self.nets, self.totals, self.autocast = nets, totals, autocast
        self.scaler, self.guard, self.limit = scaler, guard, max_consecutive_skips
        self.remedies, self.ema, self.progress = remedies, ema, progress or Progress(0, 0, 1)
        self.loss = losses.LOSSES[remedies.loss]
        device = totals.stats.device
        self.one = torch.ones((), device=device)
        self.noise = torch.zeros((), device=device) if remedies.instance_noise > 0 else None
        self.fault_steps = faults.overflow_steps()
        self.fault = torch.ones((), device=device) if self.fault_steps else None

    def set_step(self, step: int) -> None:
        """Set the per-step values for step `step` (0-based) by eager fills, so that a graph replayed
        next reads them: the EMA's decay, the instance-noise level, and injected faults (faults.py)."""
        images_seen = self.progress.images(step + 1)
        if self.ema is not None:
            self.ema.set_images(images_seen)
        if self.noise is not None:
            self.noise.fill_(self.remedies.noise_std(images_seen))
        if self.fault is not None:
            self.fault.fill_(float("inf") if step + 1 in self.fault_steps else 1.0)

    def d_view(self, x: torch.Tensor) -> torch.Tensor:
        """The image as D sees it: augmented, then noised (both off in the paper's recipe)."""
        if self.remedies.diffaugment:
            x = diff_augment(x, self.remedies.diffaugment)
        if self.noise is not None:
            x = x + torch.randn_like(x) * self.noise.to(x.dtype)
        return x

    def __call__(self, real_u8: torch.Tensor, z: torch.Tensor) -> None:
        n = self.nets
        real = real_u8.float().div_(127.5).sub_(1.0)                 # uint8 -> [-1, 1], layout kept
        # D phase. G's forward keeps its graph: the G phase reuses `fake` (as the paper's code does).
        with self.autocast():
            fake = n.G(z)
            # Two passes, not one on the concatenation: BatchNorm keeps separate real and fake statistics.
            real_logits, fake_logits = n.D(self.d_view(real)), n.D(self.d_view(fake.detach()))
            loss_d = self.loss.d(real_logits, fake_logits, self.remedies.real_target)
        applied_d = self._update(n.opt_d, loss_d)
        # G phase, through the bare D with its grads off: no D grads are computed or all-reduced.
        n.D_local.requires_grad_(False)
        with self.autocast():
            loss_g = self.loss.g(n.D_local(self.d_view(fake)))
        applied_g = self._update(n.opt_g, loss_g)
        n.D_local.requires_grad_(True)
        if self.ema is not None:
            self.ema.update(n.G_local)
        stats = torch.stack([loss_d.detach(), loss_g.detach(), self.loss.d_output(real_logits.detach()).mean(),
                             self.loss.d_output(fake_logits.detach()).mean()]).float()
        self._account(stats, applied_d, applied_g)

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> Optional[torch.Tensor]:
        """backward + step. Returns a device bool, True if the update applied (None: always applies)."""
        opt.zero_grad(set_to_none=True)
        if self.fault is not None:
            loss = loss * self.fault
        if self.scaler is not None:
            scaled = self.scaler.scale(loss)          # creates the scale tensor on first use
            before = amp.scale_of(self.scaler).clone()
            scaled.backward()
            self.scaler.step(opt)             # fused Adam takes the scale and found_inf: no sync
            self.scaler.update()
            return amp.scale_of(self.scaler) >= before      # it only backs off when it found an inf
        loss.backward()
        if not self.guard:
            opt.step()
            return None
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        found_inf = amp.non_finite(grads, self.one)
        with amp.skip_if(opt, found_inf):                   # fused Adam skips on the device
            opt.step()
        return found_inf == 0

    def _account(self, stats: torch.Tensor, applied_d, applied_g) -> None:
        t = self.totals
        t.step.add_(1)
        finite = torch.isfinite(stats[:2]).all()
        if self.guard:          # skipped steps are counted instead; keep them out of the logged means
            t.stats.add_(torch.where(finite, stats, torch.zeros_like(stats)))
        else:
            t.stats.add_(stats)
            t.first_bad.copy_(torch.where(finite, t.first_bad, torch.minimum(t.first_bad, t.step)))
        if applied_d is None:
            return
        skipped = torch.stack([~applied_d, ~applied_g]).long()
        t.skipped.add_(skipped)
        t.consecutive.copy_(torch.where(skipped.any(), t.consecutive + 1, torch.zeros_like(t.consecutive)))
        hit = t.consecutive >= self.limit
        t.gave_up.copy_(torch.where(hit, torch.minimum(t.gave_up, t.step), t.gave_up))


@contextlib.contextmanager
def on_stream(stream: Optional["torch.cuda.Stream"]):
    """Run the block on `stream`, ordered after the work already queued and before the work that follows
    on the current stream. None: the current stream, as it is."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


class StepRunner:
    """Feeds `TrainStep` from static input buffers, eagerly or as one CUDA graph.

    The batch and the noise are copied into the same buffers every step, so a captured graph reads new
    data on each replay. With `graph`, the first `warmup_steps` run eagerly on a side stream (DDP needs
    11 such steps before capture; optimizer and scaler state are created there), the next step is
    captured on that same stream, and every step from then on is one `replay()`. The warm-up and the
    capture are real training steps: nothing is run twice.
    """

    def __init__(self, step: TrainStep, batch_shape: tuple[int, ...], nz: int, device: torch.device,
                 channels_last: bool, graph: bool = False, warmup_steps: int = 3,
                 stream: Optional["torch.cuda.Stream"] = None):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.step = step
        self.real_u8 = torch.empty(batch_shape, dtype=torch.uint8, device=device, memory_format=layout)
        self.z = torch.empty(batch_shape[0], nz, device=device)
        self.use_graph, self.warmup_steps = graph, warmup_steps
        self.stream = stream if stream is not None or not graph else torch.cuda.Stream(device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.eager_steps = 0

    def __call__(self, batch_u8: torch.Tensor, step: int) -> None:
        """Train on `batch_u8` (uint8, host or device) as step `step` (0-based)."""
        self.real_u8.copy_(batch_u8, non_blocking=True)
        self.z.normal_()
        self.step.set_step(step)
        if not self.use_graph:
            self.step(self.real_u8, self.z)
        elif self.graph is not None:
            self.graph.replay()
        elif self.eager_steps < self.warmup_steps:
            with on_stream(self.stream):
                self.step(self.real_u8, self.z)
            self.eager_steps += 1
        else:
            self._capture()
            self.graph.replay()                  # capturing records the step; replaying runs it

    def _capture(self) -> None:
        for opt in (self.step.nets.opt_d, self.step.nets.opt_g):
            opt.zero_grad(set_to_none=True)       # grads are then allocated from the graph's own pool
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps running while we capture.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self.step(self.real_u8, self.z)
        self.graph = graph
