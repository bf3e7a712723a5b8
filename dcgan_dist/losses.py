"""GAN losses on discriminator logits. Plain functions: no ranks, no devices, autocast-safe.

softplus(-l) = BCE-with-logits(l, 1) and softplus(l) = BCE-with-logits(l, 0), exactly and stably; writing
them this way skips allocating target tensors every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """Discriminator: BCE against `real_target` for reals (1 in the paper; 1 - eps with one-sided label
    smoothing, Salimans et al. 2016) and 0 for fakes, averaged over each batch."""
    real, fake = real_logits.float(), fake_logits.float()
    loss_real = F.softplus(-real).mean()
    if real_target != 1.0:
        loss_real = real_target * loss_real + (1.0 - real_target) * F.softplus(real).mean()
    return loss_real + F.softplus(fake).mean()


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator, non-saturating form from the paper: -log D(G(z))."""
    return F.softplus(-fake_logits.float()).mean()
