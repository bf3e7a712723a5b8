"""The loss registry: each loss against its paper's formula, its optimum, and the config key it drives."""
import pytest
import torch

from dcgan_dist.config import ConfigError, load_config
from dcgan_dist.nets import losses
from dcgan_dist.train.trainer import check_choices

REAL = torch.tensor([2.0, 0.5, -1.0, 3.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5, -0.5])


def test_lsgan_is_half_the_mean_squared_distance_to_the_targets():
    assert losses.d_lsgan(REAL, FAKE).item() == pytest.approx(
        0.5 * ((REAL - 1) ** 2).mean().item() + 0.5 * (FAKE ** 2).mean().item())
    assert losses.g_lsgan(FAKE).item() == pytest.approx(0.5 * ((FAKE - 1) ** 2).mean().item())
    assert losses.d_lsgan(torch.ones(3), torch.zeros(3)).item() == 0.0


def test_hinge_is_zero_once_d_clears_the_margins():
    expected = torch.relu(1 - REAL).mean() + torch.relu(1 + FAKE).mean()
    assert losses.d_hinge(REAL, FAKE).item() == pytest.approx(expected.item())
    assert losses.d_hinge(torch.full((3,), 1.5), torch.full((3,), -2.0)).item() == 0.0
    assert losses.g_hinge(FAKE).item() == pytest.approx(-FAKE.mean().item())


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_every_loss_pushes_d_apart_and_g_towards_real(name):
    loss = losses.LOSSES[name]
    # Between every loss's targets for fakes and reals (LSGAN pulls a real above 1 back down to 1).
    between = torch.tensor([0.1, 0.4, 0.6, 0.9])
    real, fake = between.clone().requires_grad_(), between.flip(0).clone().requires_grad_()
    loss.d(real, fake).backward()
    assert (real.grad <= 0).all() and (fake.grad >= 0).all() and real.grad.abs().sum() > 0
    fake_g = between.clone().requires_grad_()
    loss.g(fake_g).backward()
    assert (fake_g.grad < 0).all()                           # G raises D's score of its fakes
    assert torch.isfinite(loss.d(torch.full((4,), 200.0, dtype=torch.bfloat16), torch.full((4,), -200.0)))


def test_the_registry_is_the_config_keys_choices():
    assert load_config(None, ["gan.loss=hinge"]).gan.loss == "hinge"
    with pytest.raises(ConfigError, match=r"gan.loss.*'wgan'.*bce, lsgan, hinge"):
        check_choices(load_config(None, ["gan.loss=wgan"]))
    with pytest.raises(ConfigError, match="gan.label_smoothing.*gan.loss=hinge"):
        check_choices(load_config(None, ["gan.loss=hinge", "gan.label_smoothing=0.1"]))
    assert load_config(None, []).gan.loss == "bce"              # the paper's by default


@pytest.mark.parametrize("name", ["lsgan", "hinge"])
def test_a_real_launch_trains_with_each_new_loss(shards32, tmp_path, name):
    import math

    from conftest import launch_cmd, read_metrics, run
    from test_faults import fp32_args

    run_dir = tmp_path / "run"
    out = run(launch_cmd(fp32_args(shards32, run_dir, steps=6, **{"gan.loss": name, "wandb.mode": "disabled"}),
                         num_processes=1), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in read_metrics(run_dir) if "loss_d" in r]
    assert len(rows) == 6 and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)
    assert "loss: " + name in (run_dir / "config.yaml").read_text()
