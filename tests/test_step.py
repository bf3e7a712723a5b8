"""The sync-free step on the CPU: skips decided on the device (guard mode and a real GradScaler with
fused Adam), the counters that carry them, and the eager runner. The CUDA graph itself is in test_gpu."""
import pytest
import torch

from dcgan_dist.models import build_models
from dcgan_dist.train.step import NO_STEP, Nets, StepRunner, Totals, TrainStep


def make(monkeypatch, fault="", scaler=None, guard=False, limit=20):
    monkeypatch.setenv("DCGAN_FAULT_OVERFLOW", fault)
    torch.manual_seed(0)
    G, D = build_models(16, 8, 8, 32)
    opts = [torch.optim.Adam(m.parameters(), 2e-4, betas=(0.5, 0.999), fused=True) for m in (G, D)]
    nets = Nets(G=G, D=D, G_local=G, D_local=D, opt_g=opts[0], opt_d=opts[1])
    totals = Totals(torch.device("cpu"), 0)
    step = TrainStep(nets, totals, lambda: torch.autocast("cpu", torch.bfloat16, enabled=False), scaler, guard,
                     limit)
    runner = StepRunner(step, (4, 3, 32, 32), 16, torch.device("cpu"), channels_last=False)
    return nets, totals, runner


def batch(i):
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))


def params(nets):
    return [p.detach().clone() for m in (nets.G_local, nets.D_local) for p in m.parameters()]


@pytest.mark.parametrize("mode", ["guard", "scaler"])
def test_a_forced_overflow_skips_both_updates_and_is_counted(monkeypatch, mode):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if mode == "scaler" else None
    nets, totals, runner = make(monkeypatch, fault="2", scaler=scaler, guard=mode == "guard")
    runner(batch(0), 0)
    before = params(nets)
    runner(batch(1), 1)                                   # step 2 (1-based): the forced overflow
    assert all(torch.equal(a, b) for a, b in zip(before, params(nets))), "a skipped update changed weights"
    runner(batch(2), 2)
    assert not all(torch.equal(a, b) for a, b in zip(before, params(nets)))
    health = totals.read()
    assert (health["skipped_d"], health["skipped_g"]) == (1, 1)
    assert health["first_bad"] == NO_STEP and health["gave_up"] == NO_STEP
    if scaler is not None:
        assert scaler.get_scale() < 2.0**8                # it backed off, as after a real fp16 overflow


def test_consecutive_skips_mark_the_step_that_reached_the_limit(monkeypatch):
    _, totals, runner = make(monkeypatch, fault="2,3,4", guard=True, limit=2)
    for i in range(5):
        runner(batch(i), i)
    health = totals.read()
    assert health["gave_up"] == 3 and health["skipped_d"] == 3
    assert totals.consecutive.item() == 0                 # step 5 applied again


def test_without_a_guard_a_nonfinite_loss_marks_the_first_bad_step(monkeypatch):
    nets, totals, runner = make(monkeypatch)
    runner(batch(0), 0)
    with torch.no_grad():
        next(nets.D_local.parameters()).fill_(float("nan"))
    runner(batch(1), 1)
    runner(batch(2), 2)
    health = totals.read()
    assert health["first_bad"] == 2 and health["skipped_d"] == 0


def test_stats_accumulate_until_read_and_zeroed(monkeypatch):
    _, totals, runner = make(monkeypatch)
    runner(batch(0), 0)
    one = totals.stats.clone()
    runner(batch(1), 1)
    assert torch.all(totals.stats != one)
    assert 0 < one[2] < 1 and 0 < one[3] < 1                  # D(x), D(G(z)) are probabilities
    assert totals.step.item() == 2


def test_a_torch_without_the_private_amp_pieces_is_named_at_start(monkeypatch):
    from dcgan_dist.ops import amp

    amp.check()
    monkeypatch.delattr(torch, "_amp_foreach_non_finite_check_and_unscale_")
    with pytest.raises(RuntimeError, match=r"lacks torch\._amp_foreach_non_finite_check_and_unscale_.*tested with"):
        amp.check()
