"""Run under `accelerate launch` with 2 ranks: perturb one parameter on rank 1 and call the replica check.

Exits 0 only if every rank raised an error naming the perturbed tensor, so the test can tell a check that
works from one that never fires.
"""
import sys

import torch

from dcgan_dist.config import load_config
from dcgan_dist.errors import RunStopped
from dcgan_dist.nets.models import build_models
from dcgan_dist.dist.collectives import check_replicas
from dcgan_dist.dist.lifecycle import shutdown
from dcgan_dist.dist.setup import build_accelerator

cfg = load_config(None, ["wandb.mode=disabled", f"run_dir={sys.argv[1]}"])
acc = build_accelerator(cfg)
torch.manual_seed(0)
G, D = build_models(nz=8, ngf=4, ndf=4, resolution=32)
if acc.process_index == 1:
    with torch.no_grad():
        D.main[2].weight[0, 0, 0, 0] += 1e-3
try:
    check_replicas(acc, {"G": G, "D": D})
    code = 1
except RunStopped as exc:
    print(f"rank {acc.process_index}: {exc}", flush=True)
    code = 0 if "'D.main.2.weight'" in str(exc) else 1
shutdown(acc)
sys.exit(code)
