"""Images from a generator, outside training: plain torch, no ranks, no Accelerate."""
from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """bf16 runs natively here: CUDA with bf16, or a CPU with avx512_bf16 or AMX (2x to 2.5x fp32 there,
    docs/PERFORMANCE.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@torch.no_grad()
def sample(G: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """G(z) with batch statistics, as in training, leaving G's BatchNorm running stats untouched."""
    saved = [b.clone() for b in G.buffers()]
    out = G(z)
    for b, s in zip(G.buffers(), saved):
        b.copy_(s)
    return out
