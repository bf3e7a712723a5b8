"""The sampling snapshot, `generator.safetensors`: the EMA generator on its own, written with every
checkpoint, so that using a trained model needs plain torch and safetensors, not the trainer:

    from dcgan_dist.run.snapshot import load_snapshot
    G, meta = load_snapshot("runs/demo/generator.safetensors")   # meta: resolution, nz, ngf, step, kimg, metrics

The metadata (strings, as safetensors requires) also names the shards it was trained on, beside which the
attribute classifier for face arithmetic is cached.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dcgan_dist.fsutil import load_safetensors, safetensors_bytes
from dcgan_dist.nets.models import Generator

FORMAT = "dcgan-dist-generator/1"
FILENAME = "generator.safetensors"


def snapshot_bytes(G: Generator, step: int, kimg: float, metrics: dict, shards: str = "") -> bytes:
    return safetensors_bytes(G.state_dict(), {
        "format": FORMAT, "resolution": str(G.resolution), "nz": str(G.nz), "ngf": str(G.ngf), "step": str(step),
        "kimg": f"{kimg:g}", "metrics": json.dumps(metrics, sort_keys=True), "shards": shards})


def load_snapshot(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """(G in train mode, as the trainer samples it, on `device`; its metadata)."""
    raw, tensors = load_safetensors(Path(path), FORMAT, "generator snapshot")
    meta = {"resolution": int(raw["resolution"]), "nz": int(raw["nz"]), "ngf": int(raw["ngf"]),
            "step": int(raw["step"]), "kimg": float(raw["kimg"]), "metrics": json.loads(raw["metrics"]),
            "shards": raw.get("shards", "")}
    G = Generator(nz=meta["nz"], ngf=meta["ngf"], resolution=meta["resolution"])
    G.load_state_dict(tensors)
    return G.to(device), meta
