"""The trainer's step under real DDP (NCCL, world size 1), eager and as a CUDA graph, from the same
weights, data and noise. Prints JSON: the per-step stats of both, and how many steps were replays.

Accelerate does not wrap a single rank in DDP, so this builds the DDP wrappers itself, as the CUDA
semantics docs ask: on the capture stream, then 11 eager warm-up steps before the capture.
"""
import json
import os
import socket

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan_dist.config import load_config
from dcgan_dist.nets.ema import EMA
from dcgan_dist.nets.models import build_models
from dcgan_dist.train.step import Nets, TrainStep, on_stream

STEPS, BATCH, WARMUP = 20, 32, 11


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trace(graph: bool, batches: list[torch.Tensor]) -> tuple[list[dict], int, bool]:
    torch.manual_seed(0)
    G, D = (m.cuda().to(memory_format=torch.channels_last) for m in build_models(100, 32, 32, 64))
    stream = torch.cuda.Stream() if graph else None
    with on_stream(stream):                                   # DDP on the capture stream
        G_ddp = DDP(G, device_ids=[0], broadcast_buffers=False, gradient_as_bucket_view=True)
        D_ddp = DDP(D, device_ids=[0], broadcast_buffers=False, gradient_as_bucket_view=True)
    opts = [torch.optim.Adam(m.parameters(), 2e-4, betas=(0.5, 0.999), fused=True, capturable=graph) for m in (G, D)]
    nets = Nets(G=G_ddp, D=D_ddp, G_local=G, D_local=D, opt_g=opts[0], opt_d=opts[1], ema=EMA(G, 10, 0.05, BATCH))
    cfg = load_config(None, ["model.ngf=32", "model.ndf=32", f"data.batch_size={BATCH}"])
    step = TrainStep(nets, cfg, lambda: torch.autocast("cuda", torch.bfloat16, cache_enabled=False), None, stream)
    assert step.warmup_steps == WARMUP
    rows, replays = [], 0
    for i, batch in enumerate(batches):
        replays += step.graph is not None
        step(batch, i, (i + 1) * BATCH)
        values = step.drain()[0].tolist()
        rows.append({"step": i + 1, **dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), values))})
    return rows, replays, isinstance(nets.D, DDP)


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    tdist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (BATCH, 64, 64, 3), dtype=torch.uint8, generator=gen).permute(0, 3, 1, 2)
               .pin_memory() for _ in range(STEPS)]
    eager, _, _ = trace(False, batches)
    graph, replays, ddp = trace(True, batches)
    tdist.destroy_process_group()
    print(json.dumps({"eager": eager, "graph": graph, "replays": replays, "expected_replays": STEPS - WARMUP - 1,
                      "ddp": ddp}))


if __name__ == "__main__":
    main()
