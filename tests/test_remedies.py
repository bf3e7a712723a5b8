"""DiffAugment, label smoothing, instance noise and the EMA generator, each on its own."""
import copy

import pytest
import torch

from dcgan_dist.config import ConfigError, load_config
from dcgan_dist.nets import augment, losses
from dcgan_dist.nets.ema import EMA, ema_beta
from dcgan_dist.nets.models import build_models
from dcgan_dist.train.step import Remedies
from dcgan_dist.train.trainer import check_choices


def images(n=8, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("policy", [("color",), ("translation",), ("cutout",), augment.POLICIES])
def test_diffaugment_keeps_shape_and_passes_gradients(policy):
    x = images().requires_grad_(True)
    y = augment.diff_augment(x, policy)
    assert y.shape == x.shape and not torch.equal(y, x)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0            # G learns through the augmentation


def test_translation_is_an_exact_whole_pixel_shift_with_zero_fill():
    torch.manual_seed(3)
    x = images(16, 16) + 2                                           # all positive, so zero fill shows
    y = augment.translation(x)
    for a, b in zip(x, y):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(torch.roll(a, (dy, dx), (1, 2))[:, max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)],
                                b[:, max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)])]
        assert found, "not a whole-pixel shift of at most 1/8 of the side"
        dy, dx = found[0]
        assert (b == 0).sum() == 3 * (16 * abs(dy) + 16 * abs(dx) - abs(dy * dx))


def test_cutout_zeroes_one_square_of_half_the_side():
    torch.manual_seed(0)
    x = images(32, 32) + 2
    zeroed = (augment.cutout(x) == 0).all(dim=1)                      # (n, h, w)
    for mask in zeroed:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h <= 16 and w <= 16 and mask.sum() == h * w           # one axis-aligned block, clipped at edges
    assert zeroed.float().mean() > 0.1


def test_color_moves_brightness_saturation_and_contrast_per_image():
    torch.manual_seed(0)
    x = images(64)
    y = augment.color(x)
    shift = (y - x).mean(dim=(1, 2, 3))
    assert shift.std() > 0.1                                          # each image draws its own


def test_unknown_diffaugment_op_is_a_config_error():
    with pytest.raises(ConfigError, match="gan.diffaugment.*'flip'.*color, translation, cutout"):
        check_choices(load_config(None, ["gan.diffaugment=color,flip"]))
    assert load_config(None, ["gan.diffaugment=color, cutout"]).gan.diffaugment == "color, cutout"


def test_one_sided_label_smoothing_moves_only_the_real_target():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(real, torch.full_like(real, 0.9)) + bce(fake, torch.zeros_like(fake))
    assert losses.d_bce(real, fake, real_target=0.9) == pytest.approx(float(expected), rel=1e-6)
    assert losses.d_bce(real, fake) == pytest.approx(float(bce(real, torch.ones(2)) + bce(fake, torch.zeros(2))))


def test_instance_noise_anneals_linearly_to_zero():
    r = Remedies(instance_noise=0.2, instance_noise_kimg=10)
    assert [r.noise_std(i) for i in (0, 5000, 10_000, 20_000)] == pytest.approx([0.2, 0.1, 0.0, 0.0])
    assert Remedies().noise_std(0) == 0.0


def test_ema_halflife_is_in_images_and_ramps_up():
    assert ema_beta(10**9, 128, halflife_kimg=10, rampup=None) ** (10_000 / 128) == pytest.approx(0.5)
    assert ema_beta(10**9, 256, halflife_kimg=10, rampup=None) ** (10_000 / 256) == pytest.approx(0.5)
    # Early on the half-life is 5% of the images seen: at 20k images, 1k.
    assert ema_beta(20_000, 128, 10, 0.05) ** (1000 / 128) == pytest.approx(0.5)
    assert ema_beta(0, 128, 10, 0.05) == 0.0 and ema_beta(10**9, 128, 0, None) == 0.0


def test_ema_update_averages_weights_and_copies_batchnorm_buffers():
    G, _ = build_models(16, 4, 4, 32)
    ema = EMA(G, halflife_kimg=1, rampup=None, batch_images=1000)     # beta = 0.5 per update
    before = copy.deepcopy(G.state_dict())
    G.train()(torch.randn(8, 16))                                     # moves the BN running stats
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    ema.set_images(10**6)
    ema.update(G)
    for name, p in ema.module.named_parameters():
        assert torch.allclose(p, before[name] + 0.5)
    for name, b in ema.module.named_buffers():
        assert torch.equal(b, dict(G.named_buffers())[name]), name
