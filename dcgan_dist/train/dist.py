"""The one place that knows about Accelerate: ranks, devices, precision, process groups, shutdown.

Everything else gets an `Accelerator` from `build_accelerator` and asks it for rank/device; models and
losses never see it.
"""
from __future__ import annotations

import gc
import hashlib
import os
import signal
import sys
from datetime import timedelta
from typing import Optional

import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object

from dcgan_dist.config import Config, ConfigError
from dcgan_dist.errors import RunStopped


def fast_precision() -> str:
    """What to train in when nobody says: bf16 where the hardware runs it natively (CUDA with bf16,
    or a CPU with avx512_bf16 or AMX: 2x to 2.5x fp32 there, docs/PERFORMANCE.md), else fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def loader_workers(config_value: Optional[int], device: torch.device, ranks_on_node: Optional[int] = None) -> int:
    """`data.num_workers`, or the fast choice: none on CPU, where the step is compute-bound and a worker
    only competes for cores; on a GPU up to 4, since one core reads about 40k img/s (docs/PERFORMANCE.md)
    and the step must never wait."""
    if config_value is not None:
        return config_value
    if device.type != "cuda":
        return 0
    if ranks_on_node is None:
        ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, (os.cpu_count() or 1) // max(1, ranks_on_node) - 1))


def resolve_mixed_precision(config_value: Optional[str], launcher_value: Optional[str]) -> str:
    """`accelerate launch --mixed_precision` (or its config file) wins; the config key may only agree.
    With neither (a plain `python launch/train.py`), the fast choice for this hardware."""
    if launcher_value is None:
        return config_value or fast_precision()
    if config_value is not None and config_value != launcher_value:
        raise ConfigError(f"config key 'train.mixed_precision': is {config_value!r} but accelerate launch "
                          f"says {launcher_value!r}; drop the key or make them agree")
    return launcher_value


# torch deprecates broadcast_buffers for forward_sync_buffers, whose False still syncs at init; we want
# exactly broadcast_buffers=False semantics, so keep it and keep the log clean.
warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)


def build_accelerator(cfg: Config) -> Accelerator:
    precision = resolve_mixed_precision(cfg.train.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"))
    accelerator = Accelerator(
        # Without cpu=True a multi-machine CPU job silently becomes N standalone processes (PITFALLS 2).
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with="wandb" if cfg.wandb.mode != "disabled" else None,
        project_dir=cfg.run_dir,
        kwargs_handlers=[
            # D runs twice (real, fake) before one backward; broadcasting BN buffers in between breaks
            # autograd on CUDA (PITFALLS 11). Each rank keeps its own BN running stats instead.
            DistributedDataParallelKwargs(broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s)),
        ],
    )
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise RuntimeError(f"accelerate formed {accelerator.num_processes} process(es) but WORLD_SIZE={expected}; "
                           "on CPU, launch with --multi_gpu --num_processes N (see README)")
    fast = fast_precision()
    if precision == "no" and fast != "no" and accelerator.is_main_process:
        # `accelerate launch` passes "no" when not told, so say what is left on the table.
        print(f"note: training in fp32; this hardware runs {fast} natively, about 2x faster: "
              f"add --mixed_precision {fast} (configs/accelerate/*.yaml do)", file=sys.stderr)
    if precision == "fp16" and accelerator.device.type == "cpu" and accelerator.is_main_process:
        print("warning: fp16 on CPU runs in fp32 without a GradScaler; use --mixed_precision bf16",
              file=sys.stderr)
    return accelerator


def describe(accelerator: Accelerator, batch_per_rank: int) -> str:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"world_size={accelerator.num_processes} device={device} ({name}) "
            f"mixed_precision={accelerator.mixed_precision} backend={accelerator.state.backend or 'none'} "
            f"batch_per_rank={batch_per_rank} global_batch={batch_per_rank * accelerator.num_processes}")


def parameter_digests(models: dict[str, torch.nn.Module]) -> dict[str, str]:
    out = {}
    for model_name, model in models.items():
        for name, p in model.named_parameters():
            data = p.detach().float().cpu().contiguous().numpy().tobytes()
            out[f"{model_name}.{name}"] = hashlib.sha256(data).hexdigest()[:16]
    return out


def check_replicas(accelerator: Accelerator, models: dict[str, torch.nn.Module]) -> dict:
    """Compare every parameter across ranks (all ranks get the result, so all raise together).

    Returns {"ranks": N, "digest": {rank: combined digest}} for the checkpoint. DDP keeps replicas equal
    by construction; a mismatch means a bug or a corrupted rank, and training on would be wasted.
    """
    mine = parameter_digests(models)
    everyone = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    for name, digest in mine.items():
        for rank, theirs in enumerate(everyone):
            if theirs.get(name) != digest:
                raise RunStopped(f"DDP replicas diverged: parameter '{name}' differs between rank "
                                 f"{accelerator.process_index} and rank {rank}; not saving this state")
    combined = [hashlib.sha256("".join(d.values()).encode()).hexdigest()[:16] for d in everyone]
    return {"ranks": len(everyone), "digest": {str(r): d for r, d in enumerate(combined)}}


def all_min(accelerator: Accelerator, value: torch.Tensor) -> int:
    """The minimum of an integer tensor over all ranks, as a Python int (a sync)."""
    value = value.clone()
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(value, torch.distributed.ReduceOp.MIN)
    return int(value.item())


def shutdown(accelerator: Accelerator, owners: list, clean: bool = True) -> None:
    """Free everything DDP-wrapped before end_training: gloo aborts at exit otherwise (PITFALLS 3).

    After an error (`clean=False`) skip the barrier: the other ranks may be stuck in a collective, and
    exiting at once lets torchrun notice and stop them.
    """
    for owner in owners:
        owner.clear()
    gc.collect()
    if clean:
        accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.free_memory()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
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
        print(f"\n[rank {os.environ.get('RANK', '0')}] got {signal.Signals(signum).name}: "
              "stopping at the next step boundary with a checkpoint", file=sys.stderr, flush=True)

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
