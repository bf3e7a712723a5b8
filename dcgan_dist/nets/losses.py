"""GAN losses on discriminator logits, and their registry. Plain functions: no ranks, no devices,
autocast-safe (everything is computed in fp32).

A loss is a pair (D loss, G loss) plus one line in LOSSES; `gan.loss` picks one by name. Each D loss
takes `real_target`, D's aim for real images: 1 in the paper, 1 - eps with one-sided label smoothing
(Salimans et al. 2016). Losses without such a target reject a smoothed one (Loss.smoothable).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def d_bce(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """The paper's: BCE against `real_target` for reals and 0 for fakes, averaged over each batch.
    softplus(-l) is BCE-with-logits(l, 1) and softplus(l) is BCE-with-logits(l, 0), exactly and stably,
    without allocating target tensors every step."""
    real, fake = real_logits.float(), fake_logits.float()
    loss_real = F.softplus(-real).mean()
    if real_target != 1.0:
        loss_real = real_target * loss_real + (1.0 - real_target) * F.softplus(real).mean()
    return loss_real + F.softplus(fake).mean()


def g_bce(fake_logits: torch.Tensor) -> torch.Tensor:
    """The paper's non-saturating form: -log D(G(z))."""
    return F.softplus(-fake_logits.float()).mean()


def d_lsgan(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """Least squares (Mao et al. 2017, the a=0, b=c=1 coding): D's raw output regressed to 1 for reals
    and 0 for fakes, each term halved as in the paper."""
    return 0.5 * ((real_logits.float() - real_target) ** 2).mean() + 0.5 * (fake_logits.float() ** 2).mean()


def g_lsgan(fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((fake_logits.float() - 1.0) ** 2).mean()


def d_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """Hinge (Lim & Ye 2017; Miyato et al. 2018): relu(1 - D(x)) + relu(1 + D(G(z)))."""
    return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def g_hinge(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.float().mean()


@dataclass(frozen=True)
class Loss:
    d: Callable[..., torch.Tensor]
    g: Callable[[torch.Tensor], torch.Tensor]
    smoothable: bool            # has a real target that label smoothing can move
    # What the logs call D(x): the logit read as a probability (BCE), or D's raw output, whose targets
    # are 1 and 0 (LSGAN) or beyond +1 and -1 (hinge).
    d_output: Callable[[torch.Tensor], torch.Tensor]


LOSSES = {
    "bce": Loss(d_bce, g_bce, smoothable=True, d_output=torch.sigmoid),
    "lsgan": Loss(d_lsgan, g_lsgan, smoothable=True, d_output=torch.Tensor.float),
    "hinge": Loss(d_hinge, g_hinge, smoothable=False, d_output=torch.Tensor.float),
}
