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
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from dcgan_dist.config import Config, ConfigError
from dcgan_dist.errors import PeerLost, RunStopped, UserError
from dcgan_dist.host import usable_cores
from dcgan_dist.sample import native_bf16


def fast_precision() -> str:
    """What to train in when nobody says: bf16 where the hardware runs it natively (CUDA with bf16,
    or a CPU with avx512_bf16 or AMX: 2x to 2.5x fp32 there, docs/PERFORMANCE.md), else fp32."""
    if torch.cuda.is_available():
        return "bf16" if native_bf16(torch.device("cuda")) else "fp16"
    return "bf16" if native_bf16(torch.device("cpu")) else "no"


def loader_workers(config_value: Optional[int], device: torch.device, ranks: Optional[int] = None) -> int:
    """`data.num_workers`, or the fast choice: none on CPU, where the step is compute-bound and a worker
    only competes for cores; on a GPU up to 4, since one core reads about 40k img/s (docs/PERFORMANCE.md)
    and the step must never wait."""
    if config_value is not None:
        return config_value
    if device.type != "cuda":
        return 0
    ranks = ranks_on_node() if ranks is None else ranks
    return max(1, min(4, usable_cores() // max(1, ranks) - 1))


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


def ranks_on_node() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def process_group_backend() -> Optional[str]:
    """NCCL wants one GPU per rank and refuses two ranks on one device; when ranks outnumber this node's
    GPUs (a test box, one shared card), fall back to gloo, which reduces CUDA tensors through the host.
    None: Accelerate's choice (NCCL on GPUs, gloo on CPUs)."""
    if torch.cuda.is_available() and ranks_on_node() > torch.cuda.device_count():
        return "gloo"
    return None


def cpu_threads(config_value: Optional[int]) -> int:
    """`train.cpu_threads_per_rank`, or this node's usable cores (affinity, capped by a container's
    CPU quota) shared out among its ranks. Not the OMP_NUM_THREADS that `accelerate launch` exports: it
    sets 1 unless told otherwise, and a rank cannot tell that default from a user's choice."""
    if config_value is not None:
        return config_value
    return max(1, usable_cores() // max(1, ranks_on_node()))


def _tune_kernels(deterministic: bool) -> None:
    """cuDNN autotuning picks the fastest convolution per shape, at the price of run-to-run bits.
    Deterministic mode trades that speed for kernels that give the same bits on every run."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")      # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    else:
        torch.backends.cudnn.benchmark = True


# D runs twice (real, fake) before one backward; broadcasting BN buffers in between breaks autograd on
# CUDA (pytorch#175024), so each rank keeps its own BN running stats. Bucket views: the grads live in DDP's
# buckets, which saves a copy of them each step.
DDP_OPTIONS = dict(broadcast_buffers=False, gradient_as_bucket_view=True)


def build_accelerator(cfg: Config) -> Accelerator:
    precision = resolve_mixed_precision(cfg.train.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"))
    _tune_kernels(cfg.train.deterministic)
    backend = process_group_backend()
    accelerator = Accelerator(
        # Without cpu=True a multi-machine CPU job silently becomes N standalone processes.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with="wandb" if cfg.wandb.mode != "disabled" else None,
        project_dir=cfg.run_dir,
        kwargs_handlers=[
            DistributedDataParallelKwargs(**DDP_OPTIONS),
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s),
                                   **({"backend": backend} if backend else {})),
        ],
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.cpu_threads_per_rank))
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
    if backend == "gloo" and accelerator.is_main_process:
        print(f"note: {ranks_on_node()} ranks share {torch.cuda.device_count()} GPU(s); NCCL needs a GPU per "
              "rank, so this run reduces over gloo (slow: for tests, not for training)", file=sys.stderr)
    return accelerator


def ranks_share_gpus(accelerator: Accelerator) -> bool:
    """CUDA ranks reducing over gloo: `process_group_backend` chose it because ranks outnumber GPUs.
    Accelerate then names devices that do not exist (cuda:local_rank), so `prepare` and `barrier` step in."""
    return accelerator.device.type == "cuda" and accelerator.state.backend == "gloo"


def prepare(accelerator: Accelerator, models: list, optimizers: list) -> tuple[list, list]:
    """`accelerator.prepare`, except where ranks share a GPU: Accelerate gives rank r `device_ids=[r]`,
    a device that does not exist there, so DDP is wrapped around the rank's real device here instead,
    with the same options. Accelerate still places, registers and checkpoints everything."""
    if not ranks_share_gpus(accelerator):
        out = accelerator.prepare(*models, *optimizers)
        return list(out[:len(models)]), list(out[len(models):])
    from torch.nn.parallel import DistributedDataParallel

    models = [DistributedDataParallel(accelerator.prepare_model(m, evaluation_mode=True),   # no DDP from it
                                      device_ids=[accelerator.device.index], **DDP_OPTIONS) for m in models]
    return models, [accelerator.prepare_optimizer(o) for o in optimizers]


def barrier(accelerator: Accelerator) -> None:
    """`accelerator.wait_for_everyone()`, except where ranks share a GPU: it calls
    `barrier(device_ids=[local_rank])`, and cuda:1 does not exist on a one-GPU box (seen on an H100)."""
    if ranks_share_gpus(accelerator):
        torch.distributed.barrier(device_ids=[accelerator.device.index])
    else:
        accelerator.wait_for_everyone()


def autocast(accelerator: Accelerator):
    """The one mixed-precision context for a whole D or G phase. The weight-cast cache is off because
    a captured CUDA graph must not keep pointers into a cache that is freed when the context exits.
    fp16 on a CPU stays fp32, as Accelerate runs it."""
    device, precision = accelerator.device.type, accelerator.mixed_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    enabled = dtype is not None and (device == "cuda" or precision == "bf16")
    return lambda: torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=enabled, cache_enabled=False)


def bare(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module inside any DDP wrapper, with Accelerate's per-forward autocast taken off again: the
    step sets autocast once per phase (`autocast`), not once per call."""
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def use_cuda_graph(config_value: Optional[bool], accelerator: Accelerator) -> bool:
    """`train.cuda_graph`, or on wherever a graph can hold the step: CUDA, with one rank or NCCL (a
    graph can replay NCCL collectives, not gloo's host-side ones)."""
    problem = None
    if accelerator.device.type != "cuda":
        problem = "this run has no CUDA device"
    elif accelerator.num_processes > 1 and accelerator.state.backend != "nccl":
        problem = f"its ranks reduce over {accelerator.state.backend}, and a graph can only replay NCCL"
    if config_value is None:
        return problem is None
    if config_value and problem:
        raise ConfigError(f"config key 'train.cuda_graph' is true but {problem}; set it to false or null")
    return config_value


def graph_stream(accelerator: Accelerator, graph: bool) -> Optional["torch.cuda.Stream"]:
    """The side stream that DDP is built on, the warm-up runs on and the graph is captured on: DDP's
    autograd hooks must belong to the capture stream (CUDA semantics docs, 'DDP and CUDA graphs')."""
    return torch.cuda.Stream(accelerator.device) if graph else None


def describe(accelerator: Accelerator, batch_per_rank: int, graph: bool = False) -> str:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = f" threads={torch.get_num_threads()}" if device.type == "cpu" else f" cuda_graph={graph}"
    return (f"world_size={accelerator.num_processes} device={device} ({name}){threads} "
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
    everyone = gather_all(accelerator, mine)
    for name, digest in mine.items():
        for rank, theirs in enumerate(everyone):
            if theirs.get(name) != digest:
                raise RunStopped(f"DDP replicas diverged: parameter '{name}' differs between rank "
                                 f"{accelerator.process_index} and rank {rank}; not saving this state")
    combined = [hashlib.sha256("".join(d.values()).encode()).hexdigest()[:16] for d in everyone]
    return {"ranks": len(everyone), "digest": {str(r): d for r, d in enumerate(combined)}}


# Startup work varies with what the ranks read (a lock to wait out, a set to verify, checkpoints on slow
# storage), so its collectives wait this long for a slow peer, not `train.collective_timeout_s`, which
# is sized for training steps. A peer that died is still noticed at once: its connection closes.
STARTUP_TIMEOUT_S = 1800
_startup_group = None


def startup_group(accelerator: Accelerator):
    """The gloo group for startup collectives (STARTUP_TIMEOUT_S); None with one process. Created on
    first use, which every rank reaches in the same order."""
    global _startup_group
    if accelerator.num_processes == 1:
        return None
    if _startup_group is None:
        _startup_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    return _startup_group


def gather_all(accelerator: Accelerator, obj, startup: bool = False) -> list:
    """Every rank's `obj`, in rank order, on every rank. `startup`: over the startup group."""
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj, group=startup_group(accelerator) if startup else None)
    return out


def broadcast_from_main(accelerator: Accelerator, obj):
    """Rank 0's `obj` on every rank, over the startup group."""
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=startup_group(accelerator))
    return box[0]


def on_main(accelerator: Accelerator, fn) -> None:
    """Collective, over the startup group: global rank 0 runs `fn`; if it raises a UserError, every rank
    raises the same one (same class, same line), so the whole job stops together with rank 0's message
    instead of the others hanging in their next collective."""
    failure = None
    if accelerator.is_main_process and fn is not None:
        try:
            fn()
        except UserError as exc:
            failure = (type(exc).__name__, str(exc))
    failure = broadcast_from_main(accelerator, failure)
    if failure is not None:
        kinds = {cls.__name__: cls for cls in (UserError, RunStopped, PeerLost, ConfigError)}
        raise kinds.get(failure[0], UserError)(failure[1])


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


def all_min(accelerator: Accelerator, value: torch.Tensor) -> list[int]:
    """The elementwise minimum of an integer tensor over all ranks, as Python ints (a sync)."""
    value = value.clone()
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(value, torch.distributed.ReduceOp.MIN)
    return [int(v) for v in value.flatten().tolist()]


def shutdown(accelerator: Accelerator, owners: list, clean: bool = True) -> None:
    """Free everything DDP-wrapped before the process group goes: a gloo job whose wrapped models are
    still alive at exit aborts in about 4 runs of 10 ("terminate called without an active exception").

    After an error (`clean=False`) skip the barrier and leave the process group alone: the other ranks
    may be stuck in a collective, or stopped, and destroying a group with a peer that does not answer
    blocks for ever (seen with gloo and a SIGSTOPped peer). Exiting at once lets torchrun notice and
    stop them.
    """
    global _startup_group
    for owner in owners:
        owner.clear()
    gc.collect()
    if clean:
        barrier(accelerator)
    _finish_trackers(accelerator)
    accelerator.free_memory()
    if clean and torch.distributed.is_available() and torch.distributed.is_initialized():
        _startup_group = None
        torch.distributed.destroy_process_group()


def _finish_trackers(accelerator: Accelerator) -> None:
    """W&B's finish must not fail the run: under Slurm a `scancel --signal=TERM` reaches every process of
    the job, W&B's own service too, and finish() then raises ConnectionResetError on a finished run."""
    for tracker in accelerator.trackers:
        try:
            tracker.finish()
        except Exception as exc:  # noqa: BLE001
            print(f"warning: W&B finish failed ({type(exc).__name__}: {exc}); the run's files are kept "
                  "in run_dir/wandb", file=sys.stderr, flush=True)
    accelerator.trackers = []


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
