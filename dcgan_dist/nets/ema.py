"""An exponential moving average of G's weights, the generator that samples, metrics and exports use.

Averaging G over its last few thousand updates smooths out the oscillation of GAN training and gives
visibly better samples and FID (Karras et al. 2018; Yazıcı et al. 2019). The half-life is counted in
images seen (kimg), so it means the same at any batch size or rank count, and it ramps up as
StyleGAN2-ADA's does: early on, the half-life is at most `rampup` x the images seen so far, so the EMA
does not average in the untrained weights of step 0. BatchNorm buffers are copied, not averaged.

Plain torch: no ranks, no devices. `update` reads beta from a device tensor set beforehand by
`set_images`, so a captured CUDA graph can hold the update.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


def ema_beta(images_seen: float, batch_images: int, halflife_kimg: float, rampup: Optional[float]) -> float:
    """Decay per update of `batch_images` images, so that a weight's share halves every half-life."""
    halflife_images = halflife_kimg * 1000
    if rampup is not None:
        halflife_images = min(halflife_images, images_seen * rampup)
    if halflife_images <= 0:
        return 0.0
    return 0.5 ** (batch_images / halflife_images)


class EMA:
    def __init__(self, G: nn.Module, halflife_kimg: float, rampup: Optional[float], batch_images: int):
        self.module = copy.deepcopy(G).requires_grad_(False)
        self.halflife_kimg, self.rampup, self.batch_images = halflife_kimg, rampup, batch_images
        device = next(self.module.parameters()).device
        self.beta = torch.zeros((), device=device)
        self.one_minus_beta = torch.ones((), device=device)

    def set_images(self, images_seen: float) -> None:
        """Set beta for the update that brings the count of images seen to `images_seen`. Eager fills:
        no host sync, and a graph replayed afterwards reads the new value."""
        beta = ema_beta(images_seen, self.batch_images, self.halflife_kimg, self.rampup)
        self.beta.fill_(beta)
        self.one_minus_beta.fill_(1.0 - beta)

    @torch.no_grad()
    def update(self, G: nn.Module) -> None:
        ema, src = list(self.module.parameters()), list(G.parameters())
        torch._foreach_mul_(ema, self.beta)
        torch._foreach_add_(ema, torch._foreach_mul(src, self.one_minus_beta))
        torch._foreach_copy_(list(self.module.buffers()), list(G.buffers()))
