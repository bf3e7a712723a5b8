"""DCGAN generator and discriminator (Radford et al., 2016). Plain torch.nn: no ranks, no devices.

Both nets are built from the resolution: one up/down block per doubling between 4x4 and the image, so
32, 64 and 128 px share one definition. At 64 px with ngf = ndf = 64 they are exactly the paper's nets.
"""
from __future__ import annotations

import math

import torch
from torch import nn

RESOLUTIONS = (32, 64, 128)


def _num_doublings(resolution: int) -> int:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution}")
    return int(math.log2(resolution)) - 2  # 4x4 -> resolution


class Generator(nn.Module):
    """z (B, nz) or (B, nz, 1, 1) -> image (B, nc, R, R) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, resolution: int = 64, nc: int = 3):
        super().__init__()
        self.nz, self.ngf, self.resolution = nz, ngf, resolution
        n = _num_doublings(resolution)
        mult = 2 ** (n - 1)                                    # 64 px: ngf*8 at 4x4, as in the paper
        layers = [
            nn.ConvTranspose2d(nz, ngf * mult, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * mult),
            nn.ReLU(True),                                     # state: (ngf*mult) x 4 x 4
        ]
        for i in range(n - 1):
            c_in, c_out = ngf * mult >> i, ngf * mult >> (i + 1)
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),                                 # state: c_out x 2^(i+3) x 2^(i+3)
            ]
        layers += [
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),                                         # state: nc x R x R
        ]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.reshape(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """image (B, nc, R, R) -> logits (B,). No sigmoid: the loss takes logits, which is autocast-safe."""

    def __init__(self, ndf: int = 64, resolution: int = 64, nc: int = 3):
        super().__init__()
        n = _num_doublings(resolution)
        layers = [
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),                   # state: ndf x R/2 x R/2 (no BN on input, per paper)
        ]
        for i in range(n - 1):
            c_in, c_out = ndf << i, ndf << (i + 1)
            layers += [
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),               # state: c_out x R/2^(i+2) x R/2^(i+2)
            ]
        layers += [nn.Conv2d(ndf << (n - 1), 1, 4, 1, 0, bias=False)]  # state: 1 x 1 x 1
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).flatten()


def init_weights(module: nn.Module) -> None:
    """Paper init: conv weights ~ N(0, 0.02); BatchNorm gamma ~ N(1, 0.02), beta = 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def sample(G: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """G(z) with batch statistics, as in training, leaving G's BatchNorm running stats untouched."""
    saved = [b.clone() for b in G.buffers()]
    out = G(z)
    for b, s in zip(G.buffers(), saved):
        b.copy_(s)
    return out


def build_models(nz: int, ngf: int, ndf: int, resolution: int) -> tuple[Generator, Discriminator]:
    G = Generator(nz=nz, ngf=ngf, resolution=resolution)
    D = Discriminator(ndf=ndf, resolution=resolution)
    G.apply(init_weights)
    D.apply(init_weights)
    return G, D
