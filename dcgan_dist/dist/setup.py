"""The one place that builds an Accelerator: devices, precision, CPU threads, loader workers, DDP and its
options, CUDA graphs. Everything else asks the Accelerator it gets for rank and device; models, losses
and metrics never see it."""
from __future__ import annotations

import os
import warnings
from datetime import timedelta
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from dcgan_dist.config import Config, ConfigError
from dcgan_dist.errors import note, warn
from dcgan_dist.host import usable_cores
from dcgan_dist.ops.amp import native_bf16

# D runs twice (real, fake) before one backward; broadcasting BN buffers in between breaks autograd on
# CUDA (pytorch#175024), so each rank keeps its own BN running stats. Bucket views: the grads live in DDP's
# buckets, which saves a copy of them each step.
DDP_OPTIONS = dict(broadcast_buffers=False, gradient_as_bucket_view=True)


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


def _accelerator(threads: Optional[int], timeout_s: float, **kwargs) -> Accelerator:
    """An Accelerator whose world size is the launcher's, and CPU ranks with their share of the cores."""
    backend = process_group_backend()
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s), **({"backend": backend} if backend else {}))
    # Without cpu=True a multi-machine CPU job silently becomes N standalone processes.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[group, *kwargs.pop("handlers", [])],
                              **kwargs)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(threads))
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise RuntimeError(f"accelerate formed {accelerator.num_processes} process(es) but WORLD_SIZE={expected}; "
                           "on CPU, launch with --multi_gpu --num_processes N (see README)")
    if backend == "gloo":
        note(f"{ranks_on_node()} ranks share {torch.cuda.device_count()} GPU(s); NCCL needs a GPU per rank, so "
             "this run reduces over gloo (slow: for tests, not for training)")
    return accelerator


def build_accelerator(cfg: Config) -> Accelerator:
    """For training: the precision the launcher or the config asks for, DDP as the step needs it."""
    precision = resolve_mixed_precision(cfg.train.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"))
    _tune_kernels(cfg.train.deterministic)
    # torch deprecates broadcast_buffers for forward_sync_buffers, whose False still syncs at init; we
    # want exactly broadcast_buffers=False.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    accelerator = _accelerator(cfg.train.cpu_threads_per_rank, cfg.train.collective_timeout_s,
                               mixed_precision=precision, project_dir=cfg.run_dir,
                               handlers=[DistributedDataParallelKwargs(**DDP_OPTIONS)])
    fast = fast_precision()
    if precision == "no" and fast != "no":
        # `accelerate launch` passes "no" when not told, so say what is left on the table.
        note(f"training in fp32; this hardware runs {fast} natively, about 2x faster: add --mixed_precision "
             f"{fast} (configs/accelerate/*.yaml do)")
    if precision == "fp16" and accelerator.device.type == "cpu":
        warn("fp16 on CPU runs in fp32 without a GradScaler; use --mixed_precision bf16")
    return accelerator


def build_eval_accelerator(cpu_threads_per_rank: Optional[int] = None) -> Accelerator:
    """For scoring a generator outside training: no DDP, no mixed precision (the protocol is fp32, as
    StyleGAN2-ADA's metrics are), a generous collective timeout for slow shard reads."""
    return _accelerator(cpu_threads_per_rank, 1800)


def ranks_share_gpus(accelerator: Accelerator) -> bool:
    """CUDA ranks reducing over gloo: `process_group_backend` chose it because ranks outnumber GPUs.
    Accelerate then names devices that do not exist (cuda:local_rank), so `prepare` and `barrier` step in."""
    return accelerator.device.type == "cuda" and accelerator.state.backend == "gloo"


def prepare(accelerator: Accelerator, models: list, optimizers: list) -> tuple[list, list]:
    """`accelerator.prepare`, except where ranks share a GPU: Accelerate gives rank r `device_ids=[r]`,
    a device that does not exist there, so DDP is wrapped around the rank's real device here instead,
    with the same options."""
    if not ranks_share_gpus(accelerator):
        out = accelerator.prepare(*models, *optimizers)
        return list(out[:len(models)]), list(out[len(models):])
    from torch.nn.parallel import DistributedDataParallel

    models = [DistributedDataParallel(accelerator.prepare_model(m, evaluation_mode=True),   # no DDP from it
                                      device_ids=[accelerator.device.index], **DDP_OPTIONS) for m in models]
    return models, [accelerator.prepare_optimizer(o) for o in optimizers]


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


def describe(accelerator: Accelerator, batch_per_rank: int, graph: bool = False) -> str:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = f" threads={torch.get_num_threads()}" if device.type == "cpu" else f" cuda_graph={graph}"
    return (f"world_size={accelerator.num_processes} device={device} ({name}){threads} "
            f"mixed_precision={accelerator.mixed_precision} backend={accelerator.state.backend or 'none'} "
            f"batch_per_rank={batch_per_rank} global_batch={batch_per_rank * accelerator.num_processes}")
