"""One training step, D then G, that never waits for the host; eagerly, or replayed as one CUDA graph.

Losses, skip counts and the first bad step accumulate in device tensors that the Trainer collects at log
steps only (`drain`, `health`). Nothing in a step calls `.item()`, so the whole step can be captured once
with `torch.cuda.graph` and replayed: at 64 px a step is a few hundred small kernels, and launching them
one by one from Python costs more than running them (docs/PERFORMANCE.md).

Why a hand-written capture rather than `torch.compile(mode="reduce-overhead")`: with BatchNorm under DDP
that skips cudagraphs or re-records every step (pytorch#139207, #140395), and DDP's `static_graph=True`
fails when D runs forward twice before one backward (pytorch#58111). Capturing by hand avoids both.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from dcgan_dist.config import Config
from dcgan_dist.nets import losses
from dcgan_dist.nets.augment import diff_augment, parse_policy
from dcgan_dist.nets.ema import EMA
from dcgan_dist.ops import amp

NO_STEP = 2**62                     # "no such step yet" in the device-side step markers


@dataclass
class Nets:
    """G and D as prepared (DDP-wrapped on several ranks), the bare modules, the inner torch optimizers
    (unwrapped once: Accelerate's wrappers cost about 0.3 ms of Python per step, 7-9% of a step at 200+
    steps/s, read in accelerate 1.15) and the EMA of G that samples, metrics and exports use."""

    G: nn.Module
    D: nn.Module
    G_local: nn.Module
    D_local: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EMA

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G_local, "D": self.D_local, "ema": self.ema.module}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt_g": self.opt_g, "opt_d": self.opt_d}


@dataclass(frozen=True)
class Remedies:
    """What D sees and aims for, beyond the paper (config section `gan`); the defaults are the paper."""

    loss: str = "bce"                      # a name in losses.LOSSES
    diffaugment: tuple[str, ...] = ()      # DiffAugment ops, applied to reals and fakes alike
    real_target: float = 1.0               # 1 - one-sided label smoothing
    instance_noise: float = 0.0            # std at the start, in [-1, 1] pixel units
    instance_noise_kimg: float = 0.0       # annealed linearly to zero over this many kimg

    @classmethod
    def of(cls, cfg: Config) -> "Remedies":
        gan = cfg.gan
        return cls(gan.loss, parse_policy(gan.diffaugment), 1.0 - gan.label_smoothing, gan.instance_noise,
                   gan.instance_noise_kimg)

    def noise_std(self, images_seen: float) -> float:
        if self.instance_noise <= 0 or images_seen >= self.instance_noise_kimg * 1000:
            return 0.0
        return self.instance_noise * (1.0 - images_seen / (self.instance_noise_kimg * 1000))


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


class TrainStep:
    """D step then G step on a uint8 batch, from static input buffers, so that a captured graph reads new
    data on each replay.

    `scaler` is the fp16 GradScaler (None otherwise). With train.nonfinite=skip, any update whose
    gradients are not finite is skipped; both decide on the device, through fused Adam's `found_inf`, so
    the host never waits, and every rank decides alike because the gradients are all-reduced by then.

    With a `stream` the step runs as a CUDA graph: the first steps run eagerly on that stream (DDP needs
    11 before a capture; optimizer and scaler state are created there), the next is captured on it, and
    every step from then on is one `replay()`. The warm-up and the capture are real training steps.
    """

    def __init__(self, nets: Nets, cfg: Config, autocast: Callable, scaler: Optional[torch.amp.GradScaler],
                 stream: Optional["torch.cuda.Stream"] = None):
        self.nets, self.autocast, self.scaler, self.stream = nets, autocast, scaler, stream
        self.remedies, self.limit = Remedies.of(cfg), cfg.train.max_consecutive_skips
        self.guard = cfg.train.nonfinite == "skip" and scaler is None
        self.loss = losses.LOSSES[self.remedies.loss]
        device = next(nets.G_local.parameters()).device
        r, layout = cfg.model.resolution, torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.real_u8 = torch.empty((cfg.data.batch_size, 3, r, r), dtype=torch.uint8, device=device,
                                   memory_format=layout)
        self.z = torch.empty(cfg.data.batch_size, cfg.model.nz, device=device)
        long = dict(dtype=torch.int64, device=device)
        self.sums = torch.zeros(4, device=device)       # loss_d, loss_g, D(x), D(G(z)) since the last drain
        self.skipped = torch.zeros(2, **long)           # D and G updates skipped since this start
        self.consecutive = torch.zeros((), **long)
        self.markers = torch.full((2,), NO_STEP, **long)  # first non-finite step; step that hit the skip limit
        self.step_no = torch.zeros((), **long)
        self.one = torch.ones((), device=device)
        self.noise = torch.zeros((), device=device) if self.remedies.instance_noise > 0 else None
        self.n, self.eager_steps, self.graph = 0, 0, None
        # DDP must see 11 eager iterations before a capture (CUDA semantics docs); a bare net needs only a
        # few, for cuDNN autotuning and the lazily created optimizer and scaler state.
        self.warmup_steps = 11 if isinstance(nets.D, nn.parallel.DistributedDataParallel) else 3
        if stream is not None:      # Adam warns at every eager step of a capturable instance: the warm-up's
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")

    def __call__(self, batch_u8: torch.Tensor, step: int, images_seen: int) -> None:
        """Train on `batch_u8` (uint8, host or device) as step `step` (0-based), after which `images_seen`
        real images will have been seen. The per-step values are eager fills a replayed graph reads."""
        self.real_u8.copy_(batch_u8, non_blocking=True)
        self.z.normal_()
        self.step_no.fill_(step + 1)
        self.nets.ema.set_images(images_seen)
        if self.noise is not None:
            self.noise.fill_(self.remedies.noise_std(images_seen))
        self.n += 1
        if self.stream is None:
            self._step()
        elif self.graph is not None:
            self.graph.replay()
        elif self.eager_steps < self.warmup_steps:
            with on_stream(self.stream):
                self._step()
            self.eager_steps += 1
        else:
            self._capture()
            self.graph.replay()                  # capturing records the step; replaying runs it

    def drain(self) -> tuple[torch.Tensor, int]:
        """The interval's sums of (loss_d, loss_g, D(x), D(G(z))) on the device and its step count; both
        start again from zero."""
        out, n = self.sums.clone(), self.n
        self.sums.zero_()
        self.n = 0
        return out, n

    def health(self) -> torch.Tensor:
        """On the device: [first non-finite step, step that hit max_consecutive_skips, D and G updates
        skipped since this start]; NO_STEP where there is none."""
        return torch.cat([self.markers, self.skipped])

    def d_view(self, x: torch.Tensor) -> torch.Tensor:
        """The image as D sees it: augmented, then noised (both off in the paper's recipe)."""
        if self.remedies.diffaugment:
            x = diff_augment(x, self.remedies.diffaugment)
        if self.noise is not None:
            x = x + torch.randn_like(x) * self.noise.to(x.dtype)
        return x

    def _step(self) -> None:
        n = self.nets
        real = self.real_u8.float().div_(127.5).sub_(1.0)              # uint8 -> [-1, 1], layout kept
        # D phase. G's forward keeps its graph: the G phase reuses `fake` (as the paper's code does).
        with self.autocast():
            fake = n.G(self.z)
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
        n.ema.update(n.G_local)
        stats = torch.stack([loss_d.detach(), loss_g.detach(), self.loss.d_output(real_logits.detach()).mean(),
                             self.loss.d_output(fake_logits.detach()).mean()]).float()
        self._account(stats, applied_d, applied_g)

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> Optional[torch.Tensor]:
        """backward + step. Returns a device bool, True if the update applied (None: always applies)."""
        opt.zero_grad(set_to_none=True)
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
        """Every update in place, so a captured graph keeps writing to the same tensors."""
        finite = torch.isfinite(stats[:2]).all()
        first_bad, gave_up = self.markers[0], self.markers[1]
        if self.guard:          # skipped steps are counted instead; keep them out of the logged means
            self.sums.add_(torch.where(finite, stats, torch.zeros_like(stats)))
        else:
            self.sums.add_(stats)
            first_bad.copy_(torch.where(finite, first_bad, torch.minimum(first_bad, self.step_no)))
        if applied_d is None:
            return
        skipped = torch.stack([~applied_d, ~applied_g]).long()
        self.skipped.add_(skipped)
        self.consecutive.copy_(torch.where(skipped.any(), self.consecutive + 1, torch.zeros_like(self.consecutive)))
        hit = self.consecutive >= self.limit
        gave_up.copy_(torch.where(hit, torch.minimum(gave_up, self.step_no), gave_up))

    def _capture(self) -> None:
        for opt in (self.nets.opt_d, self.nets.opt_g):
            opt.zero_grad(set_to_none=True)       # grads are then allocated from the graph's own pool
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps running while we capture.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self._step()
        self.graph = graph
