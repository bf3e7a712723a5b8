"""Collectives over all ranks: reductions, gathers, broadcasts, barriers, the startup group, replica digests."""
from __future__ import annotations

import hashlib
from datetime import timedelta

import torch
from accelerate import Accelerator

from dcgan_dist.config import ConfigError
from dcgan_dist.dist.setup import ranks_share_gpus
from dcgan_dist.errors import PeerLost, RunStopped, UserError

# Startup work varies with what the ranks read (a lock to wait out, a set to verify, checkpoints on slow
# storage), so its collectives wait this long for a slow peer, not `train.collective_timeout_s`, which
# is sized for training steps. A peer that died is still noticed at once: its connection closes.
STARTUP_TIMEOUT_S = 1800
_OPS = {"sum": "SUM", "mean": "SUM", "min": "MIN", "max": "MAX"}


def reduce(accelerator: Accelerator, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The elementwise sum, mean, min or max of `value` over all ranks, on every rank: the one route for
    reductions. A collective; reading the result on the host is a sync."""
    value = value.clone()
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(value, getattr(torch.distributed.ReduceOp, _OPS[op]))
    return value / accelerator.num_processes if op == "mean" else value


def barrier(accelerator: Accelerator) -> None:
    """`accelerator.wait_for_everyone()`, except where ranks share a GPU: it calls
    `barrier(device_ids=[local_rank])`, and cuda:1 does not exist on a one-GPU box (seen on an H100)."""
    if ranks_share_gpus(accelerator):
        torch.distributed.barrier(device_ids=[accelerator.device.index])
    else:
        accelerator.wait_for_everyone()


def parameter_digests(models: dict[str, torch.nn.Module]) -> dict[str, str]:
    out = {}
    for model_name, model in models.items():
        for name, p in model.named_parameters():
            data = p.detach().float().cpu().contiguous().numpy().tobytes()
            out[f"{model_name}.{name}"] = hashlib.sha256(data).hexdigest()[:16]
    return out


def check_replicas(accelerator: Accelerator, models: dict[str, torch.nn.Module]) -> dict:
    """Compare every parameter across ranks (all ranks get the result, so all raise together). Returns
    {"ranks": N, "digest": {rank: combined digest}} for the checkpoint. DDP keeps replicas equal by
    construction; a mismatch means a bug or a corrupted rank, and training on would be wasted."""
    mine = parameter_digests(models)
    everyone = gather_all(accelerator, mine)
    for name, digest in mine.items():
        for rank, theirs in enumerate(everyone):
            if theirs.get(name) != digest:
                raise RunStopped(f"DDP replicas diverged: parameter '{name}' differs between rank "
                                 f"{accelerator.process_index} and rank {rank}; not saving this state")
    combined = [hashlib.sha256("".join(d.values()).encode()).hexdigest()[:16] for d in everyone]
    return {"ranks": len(everyone), "digest": {str(r): d for r, d in enumerate(combined)}}


_startup_group = None


def startup_group(accelerator: Accelerator):
    """The gloo group for startup collectives (STARTUP_TIMEOUT_S); None with one process. Created on
    first use, which every rank reaches in the same order; dropped by `forget_startup_group`."""
    global _startup_group
    if accelerator.num_processes == 1:
        return None
    if _startup_group is None:
        _startup_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    return _startup_group


def forget_startup_group() -> None:
    """Before the process group goes, which takes the startup group with it."""
    global _startup_group
    _startup_group = None


def gather_all(accelerator: Accelerator, obj, startup: bool = False) -> list:
    """Every rank's `obj`, in rank order, on every rank. `startup`: over the startup group."""
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj, group=startup_group(accelerator) if startup else None)
    return out


def gather_batches(accelerator: Accelerator, parts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Numbered batches, each made on one rank, concatenated in batch order on every rank: the same tensor
    whatever the world size."""
    everyone = [kv for items in gather_all(accelerator, list(parts.items())) for kv in items]
    return torch.cat([t for _, t in sorted(everyone, key=lambda kv: kv[0])])


def broadcast_from_main(accelerator: Accelerator, obj, startup: bool = True):
    """Rank 0's `obj` on every rank, over the startup group (the training group with startup=False)."""
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=startup_group(accelerator) if startup else None)
    return box[0]


def on_main(accelerator: Accelerator, fn, startup: bool = True):
    """Collective: global rank 0 runs `fn` and every rank gets what it returned. If it raises a UserError,
    every rank raises the same one (same class, same line), so the whole job stops together with rank 0's
    message instead of the others hanging in their next collective. During training pass startup=False:
    the startup group waits 30 minutes for a peer, which a peer that stopped answering mid-run must not get."""
    result = failure = None
    if accelerator.is_main_process and fn is not None:
        try:
            result = fn()
        except UserError as exc:
            failure = (type(exc).__name__, str(exc))
    result, failure = broadcast_from_main(accelerator, (result, failure), startup)
    if failure is not None:
        kinds = {cls.__name__: cls for cls in (UserError, RunStopped, PeerLost, ConfigError)}
        raise kinds.get(failure[0], UserError)(failure[1])
    return result
