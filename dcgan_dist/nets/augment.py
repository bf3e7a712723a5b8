"""DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", 2020).

D sees every image, real or fake, through the same random, differentiable transforms, so it cannot
memorise a small training set, and G still gets gradients through them. Written from the paper's
description (section 3): colour (brightness, saturation, contrast), translation by up to 1/8 of the image
with zero padding, and cutout of a square half the image's side. Every op is a plain tensor op on the
batch's device, with no host syncs, so it runs inside a captured CUDA graph too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def parse_policy(text: str) -> tuple[str, ...]:
    """"color,translation" -> ("color", "translation"); "" -> (). Raises ValueError naming a bad part."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in parts:
        if p not in POLICIES:
            raise ValueError(f"unknown DiffAugment op '{p}' (known: {', '.join(POLICIES)})")
    return parts


def diff_augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """x: (B, C, H, W) in [-1, 1]. Each image draws its own parameters."""
    for op in policy:
        x = _OPS[op](x)
    return x


def _uniform(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * (hi - lo) + lo


def color(x: torch.Tensor) -> torch.Tensor:
    x = x + _uniform(x, -0.5, 0.5)                                         # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * _uniform(x, 0.0, 2.0) + mean                          # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean                       # contrast


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by whole pixels, up to ratio * size each way; vacated pixels are zero."""
    b, _, h, w = x.shape
    shift = torch.stack([(torch.rand(b, device=x.device) * 2 - 1) * round(w * ratio),
                         (torch.rand(b, device=x.device) * 2 - 1) * round(h * ratio)], dim=1).round()
    # An affine grid that moves by whole pixels, sampled nearest: an exact integer shift.
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2 * shift[:, 0] / w
    theta[:, 1, 2] = -2 * shift[:, 1] / h
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False).to(x.dtype)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of side ratio * size per image, its centre anywhere in the image."""
    b, _, h, w = x.shape
    cy = torch.rand(b, 1, 1, device=x.device) * h
    cx = torch.rand(b, 1, 1, device=x.device) * w
    ys = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    inside = ((ys - cy).abs() < h * ratio / 2) & ((xs - cx).abs() < w * ratio / 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_OPS = {"color": color, "translation": translation, "cutout": cutout}
