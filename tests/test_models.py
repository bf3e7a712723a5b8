import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dcgan_dist.nets import losses
from dcgan_dist.nets.models import Discriminator, Generator, build_models


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes(resolution):
    G, D = build_models(nz=100, ngf=16, ndf=16, resolution=resolution)
    z = torch.randn(3, 100)
    x = G(z)
    assert x.shape == (3, 3, resolution, resolution)
    assert x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (3,)
    # One up/down block per doubling: 4 -> R takes log2(R) - 2 strided layers, plus the 4x4 one.
    n_conv = lambda m, t: sum(isinstance(l, t) for l in m.modules())
    assert n_conv(G, nn.ConvTranspose2d) == n_conv(D, nn.Conv2d) == resolution.bit_length() - 2


def test_paper_architecture_at_64():
    G, D = Generator(nz=100, ngf=64, resolution=64), Discriminator(ndf=64, resolution=64)
    convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3]
    assert isinstance(list(G.modules())[-1], nn.Tanh)
    assert sum(isinstance(m, nn.ReLU) for m in G.modules()) == 4
    dconvs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in dconvs] == [64, 128, 256, 512, 1]
    assert all(m.negative_slope == 0.2 for m in D.modules() if isinstance(m, nn.LeakyReLU))
    # No pooling, no fully-connected layers, no sigmoid (D emits logits).
    banned = (nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.Sigmoid)
    assert not any(isinstance(m, banned) for m in [*G.modules(), *D.modules()])
    # BN everywhere but G's output and D's input/output layers.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 3


def test_init_statistics():
    torch.manual_seed(0)
    G, D = build_models(nz=100, ngf=64, ndf=64, resolution=64)
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > 1000:
            assert abs(m.weight.mean().item()) < 2e-3
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.05)
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.mean().item() == pytest.approx(1.0, abs=0.01)
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.35)
            assert torch.all(m.bias == 0)


def test_losses_are_bce_with_logits():
    real, fake = torch.randn(64) * 3, torch.randn(64) * 3
    bce = nn.BCEWithLogitsLoss()
    expected_d = bce(real, torch.ones(64)) + bce(fake, torch.zeros(64))
    assert losses.d_bce(real, fake).item() == pytest.approx(expected_d.item(), rel=1e-6)
    assert losses.g_bce(fake).item() == pytest.approx(bce(fake, torch.ones(64)).item(), rel=1e-6)
    # Stable for large logits, where sigmoid + BCELoss saturates.
    assert torch.isfinite(losses.d_bce(torch.full((4,), 200.0), torch.full((4,), -200.0)))


def test_bf16_autocast_forward_backward():
    G, D = build_models(nz=100, ngf=8, ndf=8, resolution=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.g_bce(D(G(torch.randn(4, 100))))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_models_and_losses_never_import_accelerate():
    code = "import sys, dcgan_dist.nets.models, dcgan_dist.nets.losses; print('accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("n, nrow", [(16, 4), (10, 4), (3, 8)])
def test_sample_grid_matches_torchvision_make_grid(n, nrow):
    from torchvision.utils import make_grid

    from dcgan_dist.report.plots import grid

    images = torch.rand(n, 3, 8, 8) * 2.4 - 1.2                      # a little out of range on both sides
    ref = make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1))
    ref = ref.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()   # as save_image
    assert np.array_equal(np.asarray(grid(images, nrow)), ref)


def test_training_path_does_not_import_torchvision():
    # torchvision costs every rank 160 MB of RSS; the trainer needs none of it.
    code = "import sys, dcgan_dist.train.trainer; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
