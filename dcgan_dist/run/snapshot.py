"""The sampling snapshot: `generator.safetensors`, the EMA generator on its own.

Written beside every full checkpoint (and the best one), so that using a trained model needs neither
the trainer nor Accelerate nor the config file: plain torch + safetensors rebuild it.

    from dcgan_dist.run.snapshot import load_snapshot
    G, meta = load_snapshot("runs/demo/generator.safetensors")   # meta: resolution, nz, ngf, step, kimg, metrics

The tensors are G's state dict; the metadata (strings, as safetensors requires) holds the model config,
the step, kimg, the run's latest eval metrics and the shards it was trained on (where the attribute
classifier for face arithmetic is cached).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dcgan_dist.errors import UserError
from dcgan_dist.nets.models import Generator

FORMAT = "dcgan-dist-generator/1"
FILENAME = "generator.safetensors"


def snapshot_bytes(G: nn.Module, *, resolution: int, nz: int, ngf: int, step: int, kimg: float,
                   metrics: dict, shards: str = "") -> bytes:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    meta = {"format": FORMAT, "resolution": str(resolution), "nz": str(nz), "ngf": str(ngf), "step": str(step),
            "kimg": f"{kimg:g}", "metrics": json.dumps(metrics, sort_keys=True), "shards": shards}
    return save(state, metadata=meta)


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - not safetensors, truncated, ...
        raise UserError(f"'{path}': not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if raw.get("format") != FORMAT:
        raise UserError(f"'{path}': not a dcgan-dist generator snapshot (format {raw.get('format')!r}, "
                        f"expected {FORMAT!r})")
    return {"resolution": int(raw["resolution"]), "nz": int(raw["nz"]), "ngf": int(raw["ngf"]),
            "step": int(raw["step"]), "kimg": float(raw["kimg"]), "metrics": json.loads(raw["metrics"]),
            "shards": raw.get("shards", "")}


def load_snapshot(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """(G in train mode, as the trainer samples it, on `device`; its metadata)."""
    from safetensors.torch import load_file

    meta = read_metadata(Path(path))
    G = Generator(nz=meta["nz"], ngf=meta["ngf"], resolution=meta["resolution"])
    G.load_state_dict(load_file(str(path)))
    return G.to(device), meta
