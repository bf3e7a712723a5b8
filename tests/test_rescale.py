"""Resume on another number of ranks, with real launches: 2 -> 3 -> 1 ranks and 2 -> 1, fp32 -> bf16 -> fp32.
kimg is carried (never step x today's batch), the EMA and the best checkpoint carry over, and the
change is stated in one line. 2 -> 2 stays bit-exact: tests/test_faults.py."""
import json
import shutil

import pytest
import torch

from conftest import accelerate_launch, overrides, saved_net
from conftest import read_metrics as metrics
from dcgan_dist.nets.ema import ema_beta

KEYS = {"model.resolution": 32, "model.ngf": 8, "model.ndf": 8, "data.batch_size": 8, "data.num_workers": 0,
        "data.shuffle_buffer": 32, "train.log_every": 1, "train.sample_every": 1000, "train.ckpt_every": 1,
        "train.keep_ckpts": 20, "train.num_samples": 4, "train.cpu_threads_per_rank": 1, "wandb.mode": "disabled",
        "train.ema_halflife_kimg": 2, "eval.metrics": "swd", "eval.num_images": 32, "eval.batch_per_rank": 8,
        "eval.every_kimg": 0.064, "eval.best_by": "swd"}


def resume(shards, run_dir, ranks, steps, precision, **over):
    args = ["--mixed_precision", precision, "launch/train.py", "--config", "configs/demo.yaml",
            f"data.shards={shards}", f"run_dir={run_dir}", f"train.steps={steps}",
            *overrides({**KEYS, **over})]
    out = accelerate_launch(args, num_processes=ranks, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def state(run_dir, step):
    return json.loads((run_dir / f"checkpoints/step-{step:08d}/trainer_state.json").read_text())


def ema(run_dir, step):
    return saved_net(run_dir / f"checkpoints/step-{step:08d}", "ema")


def generator(run_dir, step):
    return saved_net(run_dir / f"checkpoints/step-{step:08d}", "G")


@pytest.fixture(scope="module")
def rescaled(shards32, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rescale")
    outs = {"2": resume(shards32, run_dir, 2, 8, "no")}
    first_best = state(run_dir, 8)["best"]
    shrunk = run_dir.with_name(run_dir.name + "-shrunk")           # the same checkpoint, resumed on 1 rank
    shutil.copytree(run_dir, shrunk, ignore=shutil.ignore_patterns("wandb", "LOCK"))
    outs["2to1"] = resume(shards32, shrunk, 1, 10, "no")
    # One step on 3 ranks with lr 0: G stays as saved, so the EMA after it is known exactly.
    outs["3"] = resume(shards32, run_dir, 3, 9, "bf16", **{"optim.lr": 0})
    outs["1"] = resume(shards32, run_dir, 1, 13, "no")
    return run_dir, outs, first_best


def test_two_ranks_to_one_carries_kimg_and_the_best(rescaled):
    run_dir, outs, first_best = rescaled
    shrunk = run_dir.with_name(run_dir.name + "-shrunk")
    rows = {r["step"]: r["kimg"] for r in metrics(shrunk) if "loss_d" in r}
    assert rows[8] == pytest.approx(0.128) and rows[9] == pytest.approx(0.136) and rows[10] == pytest.approx(0.144)
    assert "on 1 rank instead of 2 ranks: global batch 16 -> 8" in outs["2to1"].stderr
    assert state(shrunk, 10)["best"]["value"] <= first_best["value"]


def test_kimg_is_carried_across_2_3_and_1_ranks(rescaled):
    run_dir, _, _ = rescaled
    rows = {r["step"]: r["kimg"] for r in metrics(run_dir) if "loss_d" in r}
    images = {0: 0}
    for step in range(1, 14):            # 2 ranks to step 8, 3 ranks for step 9, then 1 rank; 8 per rank
        images[step] = images[step - 1] + (16 if step <= 8 else 24 if step <= 9 else 8)
    assert sorted(rows) == list(range(1, 14))
    for step, kimg in rows.items():
        assert kimg == pytest.approx(images[step] / 1000, abs=1e-9), (step, kimg, images[step])
    final = state(run_dir, 13)
    assert final["images_seen"] == 8 * 16 + 24 + 4 * 8 == images[13]
    assert final["world_size"] == 1 and final["global_batch"] == 8


def test_each_change_is_stated_in_one_line(rescaled):
    _, outs, _ = rescaled
    for key, old, new in (("3", "2 ranks: global batch 16 -> 24", "on 3 ranks instead of "),
                          ("1", "3 ranks: global batch 24 -> 8", "on 1 rank instead of ")):
        notes = [ln for ln in outs[key].stderr.splitlines() if ln.startswith("note: resuming at step")
                 and "ranks" in ln]
        assert len(notes) == 1 and new + old in notes[0] and "optim.lr stays" in notes[0], notes
    assert "note: resuming at step 8 in bf16 instead of no" in outs["3"].stderr      # fp32 checkpoint -> bf16
    assert "note: resuming at step 9 in no instead of bf16" in outs["1"].stderr      # bf16 checkpoint -> fp32


def test_the_ema_carries_over_and_updates_with_the_new_batch(rescaled):
    run_dir, _, _ = rescaled
    saved, after = ema(run_dir, 8), ema(run_dir, 9)
    g_saved, g_after = generator(run_dir, 8), generator(run_dir, 9)
    beta = ema_beta(8 * 16 + 24, 24, 2, 0.05)
    assert 0 < beta < 1
    checked = 0
    for name, value in saved.items():
        if "running" in name or "num_batches" in name:
            continue                                     # BatchNorm buffers are copied, not averaged
        assert torch.equal(g_after[name], g_saved[name]), name      # lr 0: G did not move
        expected = beta * value.float() + (1 - beta) * g_saved[name].float()
        assert torch.allclose(after[name].float(), expected, atol=1e-6), name
        checked += 1
    assert checked >= 10


def test_the_best_checkpoint_carries_over(rescaled):
    run_dir, _, first_best = rescaled
    best = state(run_dir, 13)["best"]
    assert best["metric"] == "swd" and best["value"] <= first_best["value"]
    assert (run_dir / "checkpoints/best/COMPLETE").is_file()
    assert json.loads((run_dir / "checkpoints/best/trainer_state.json").read_text())["step"] == best["step"]
