"""Images from a generator, outside training: plain torch, no ranks, no Accelerate."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample(G: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """G(z) with batch statistics, as in training, leaving G's BatchNorm running stats untouched."""
    saved = [b.clone() for b in G.buffers()]
    out = G(z)
    for b, s in zip(G.buffers(), saved):
        b.copy_(s)
    return out
