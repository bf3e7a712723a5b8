"""GAN losses on discriminator logits. Plain functions: no ranks, no devices, autocast-safe.

softplus(-l) = BCE-with-logits(l, 1) and softplus(l) = BCE-with-logits(l, 0), exactly and stably; writing
them this way skips allocating target tensors every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator: -log D(x) - log(1 - D(G(z))), averaged over each batch."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator, non-saturating form from the paper: -log D(G(z))."""
    return F.softplus(-fake_logits.float()).mean()
