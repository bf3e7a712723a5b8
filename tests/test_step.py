"""The sync-free step on the CPU: skips decided on the device (guard mode and a real GradScaler with
fused Adam), the counters that carry them, and what `drain` hands back. The CUDA graph is in test_gpu."""
import pytest
import torch

from dcgan_dist.config import load_config
from dcgan_dist.nets.ema import EMA
from dcgan_dist.nets.models import build_models
from dcgan_dist.train.step import NO_STEP, Nets, TrainStep
from scripts.faults import force_overflow


def make(monkeypatch, fault="", scaler=None, guard=False, limit=20):
    torch.manual_seed(0)
    G, D = build_models(16, 8, 8, 32)
    opts = [torch.optim.Adam(m.parameters(), 2e-4, betas=(0.5, 0.999), fused=True) for m in (G, D)]
    nets = Nets(G=G, D=D, G_local=G, D_local=D, opt_g=opts[0], opt_d=opts[1], ema=EMA(G, 10, None, 4))
    cfg = load_config(None, ["model.nz=16", "model.resolution=32", "data.batch_size=4", "train.channels_last=false",
                             f"train.nonfinite={'skip' if guard else 'stop'}", f"train.max_consecutive_skips={limit}"])
    if fault:
        force_overflow(monkeypatch, {int(s) for s in fault.split(",")})
    step = TrainStep(nets, cfg, lambda: torch.autocast("cpu", torch.bfloat16, enabled=False), scaler)
    return nets, step


def batch(i):
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))


def params(nets):
    return [p.detach().clone() for m in (nets.G_local, nets.D_local) for p in m.parameters()]


def health(step):
    first_bad, gave_up, skipped_d, skipped_g = step.health().tolist()
    return {"first_bad": first_bad, "gave_up": gave_up, "skipped_d": skipped_d, "skipped_g": skipped_g}


@pytest.mark.parametrize("mode", ["guard", "scaler"])
def test_a_forced_overflow_skips_both_updates_and_is_counted(monkeypatch, mode):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if mode == "scaler" else None
    nets, step = make(monkeypatch, fault="2", scaler=scaler, guard=mode == "guard")
    step(batch(0), 0, 4)
    before = params(nets)
    step(batch(1), 1, 8)                                   # step 2 (1-based): the forced overflow
    assert all(torch.equal(a, b) for a, b in zip(before, params(nets))), "a skipped update changed weights"
    step(batch(2), 2, 12)
    assert not all(torch.equal(a, b) for a, b in zip(before, params(nets)))
    got = health(step)
    assert (got["skipped_d"], got["skipped_g"]) == (1, 1)
    assert got["first_bad"] == NO_STEP and got["gave_up"] == NO_STEP
    if scaler is not None:
        assert scaler.get_scale() < 2.0**8                # it backed off, as after a real fp16 overflow


def test_consecutive_skips_mark_the_step_that_reached_the_limit(monkeypatch):
    _, step = make(monkeypatch, fault="2,3,4", guard=True, limit=2)
    for i in range(5):
        step(batch(i), i, 4 * (i + 1))
    got = health(step)
    assert got["gave_up"] == 3 and got["skipped_d"] == 3
    assert step.consecutive.item() == 0                   # step 5 applied again


def test_without_a_guard_a_nonfinite_loss_marks_the_first_bad_step(monkeypatch):
    nets, step = make(monkeypatch)
    step(batch(0), 0, 4)
    with torch.no_grad():
        next(nets.D_local.parameters()).fill_(float("nan"))
    step(batch(1), 1, 8)
    step(batch(2), 2, 12)
    got = health(step)
    assert got["first_bad"] == 2 and got["skipped_d"] == 0


def test_drain_hands_back_the_interval_and_starts_it_again(monkeypatch):
    _, step = make(monkeypatch)
    step(batch(0), 0, 4)
    one, n = step.drain()
    assert n == 1 and 0 < one[2] < 1 and 0 < one[3] < 1       # D(x), D(G(z)) are probabilities
    step(batch(1), 1, 8)
    step(batch(2), 2, 12)
    two, n = step.drain()
    assert n == 2 and torch.all(two != one)
    assert step.drain()[1] == 0 and not step.sums.any()


def test_a_torch_without_the_private_amp_pieces_is_named_at_start(monkeypatch):
    from dcgan_dist.ops import amp

    amp.check()
    monkeypatch.delattr(torch, "_amp_foreach_non_finite_check_and_unscale_")
    with pytest.raises(RuntimeError, match=r"lacks torch\._amp_foreach_non_finite_check_and_unscale_.*tested with"):
        amp.check()
