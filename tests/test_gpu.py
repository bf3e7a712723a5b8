"""The CUDA path, for real: bf16 and fp16 (with the real GradScaler) runs, the whole-step CUDA graph
against eager, exact resume under deterministic kernels, pinned-memory batches, two ranks sharing one
card over gloo, and a graph captured under DDP with NCCL. Skipped without CUDA; benchmarks/gpu_check.sh
runs them on a GPU machine."""
import json
import math
import os
import sys

import pytest
import torch

from conftest import accelerate_launch, overrides, read_metrics, run
from test_faults import kill_group, last_step, start, wait_for, with_faults

gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def shards64(celeba_parent, tmp_path_factory):
    from dcgan_dist.data.celeba import open_source
    from dcgan_dist.data.shards import Sharding, write_shards

    out = tmp_path_factory.mktemp("shards64")
    write_shards(open_source(celeba_parent, "train"), out,
                 Sharding(resolution=64, split="train", shard_size=50, workers=2, progress=False, images_per_block=16))
    return out


def args(shards, run_dir, steps=20, **over):
    keys = {"data.shards": shards, "run_dir": run_dir, "model.ngf": 32, "model.ndf": 32, "data.batch_size": 32,
            "data.shuffle_buffer": 64, "train.steps": steps, "train.log_every": 1, "train.sample_every": 10,
            "train.ckpt_every": 5, "train.keep_ckpts": 2, "train.num_samples": 16, "wandb.mode": "offline",
            "eval.num_images": 64, "eval.every_kimg": None, **over}
    return ["launch/train.py", "--config", "configs/demo.yaml", *overrides(keys)]


def test_the_gpu_tests_arguments_parse_as_the_config_they_mean(tmp_path):
    # These tests only run on a GPU machine, so an argument the config rejects costs GPU time to find;
    # this one runs everywhere.
    from dcgan_dist.config import load_config

    over = {"train.cuda_graph": False, "train.deterministic": True, "train.mixed_precision": "bf16",
            "wandb.mode": "disabled", "train.ckpt_every": 4, "data.num_workers": 2}
    argv = args(tmp_path / "shards", tmp_path / "run", steps=24, **over)
    cfg = load_config(argv[2], argv[3:])
    assert cfg.eval.every_kimg is None and cfg.train.cuda_graph is False and cfg.train.deterministic is True
    assert (cfg.train.steps, cfg.train.ckpt_every, cfg.data.num_workers, cfg.model.ngf) == (24, 4, 2, 32)


def train_rows(run_dir):
    """metrics.jsonl's training rows: a run also writes an eval row at its end, which has no losses."""
    return [r for r in read_metrics(run_dir) if "loss_d" in r]


def one_gpu(precision, *rest):
    return ["--mixed_precision", precision, *rest]


def assert_close_traces(a, b, rel, note):
    assert [r["step"] for r in a] == [r["step"] for r in b], note
    for x, y in zip(a, b):
        for key in ("loss_d", "loss_g", "d_real", "d_fake"):
            assert math.isclose(x[key], y[key], rel_tol=rel, abs_tol=rel), f"{note}: step {x['step']} {key} {x[key]} vs {y[key]}"


@gpu
def test_bf16_run_uses_the_graph_checkpoints_logs_and_resumes(shards64, tmp_path):
    run_dir = tmp_path / "run"
    out = accelerate_launch(one_gpu("bf16", *args(shards64, run_dir)), num_processes=1, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "device=cuda:0" in out.stdout and "cuda_graph=True" in out.stdout and "mixed_precision=bf16" in out.stdout
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(math.isfinite(r["loss_d"]) and 0 < r["d_real"] < 1 for r in rows)
    assert (run_dir / "checkpoints/step-00000020/COMPLETE").is_file()
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    again = accelerate_launch(one_gpu("bf16", *args(shards64, run_dir, steps=30)), num_processes=1, timeout=400)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from" in again.stdout
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, 31))


@gpu
@pytest.mark.parametrize("graph", [True, False])
def test_fp16_grad_scaler_skips_forced_overflows(shards64, tmp_path, graph):
    run_dir = tmp_path / "run"
    launch = with_faults(args(shards64, run_dir, steps=10, **{"train.cuda_graph": graph}))
    out = accelerate_launch(one_gpu("fp16", *launch), num_processes=1, env={**os.environ, "DCGAN_FAULT_OVERFLOW": "5,6"},
                            timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"cuda_graph={graph}" in out.stdout and "mixed_precision=fp16" in out.stdout
    rows = {r["step"]: r for r in train_rows(run_dir)}
    for key in ("skipped_d", "skipped_g"):
        assert rows[6][key] - rows[4][key] >= 2, (key, rows[4], rows[6])   # both forced steps skipped
    assert all(math.isfinite(r["loss_d"]) for r in rows.values())


@gpu
def test_graph_gives_the_eager_losses_within_bf16_tolerance(shards64, tmp_path):
    traces = {}
    for graph in (False, True):
        run_dir = tmp_path / f"graph-{graph}"
        out = run([sys.executable, *args(shards64, run_dir, **{"train.cuda_graph": graph,
                                                                "train.deterministic": True,
                                                                "train.mixed_precision": "bf16",
                                                                "wandb.mode": "disabled"})], timeout=400)
        assert out.returncode == 0, out.stderr[-4000:]
        traces[graph] = train_rows(run_dir)
    assert_close_traces(traces[True], traces[False], 2e-2, "graph vs eager")


@gpu
def test_kill9_then_resume_matches_an_uninterrupted_gpu_run(shards64, tmp_path):
    det = {"train.deterministic": True, "train.ckpt_every": 4, "data.num_workers": 2, "wandb.mode": "disabled"}
    straight = tmp_path / "straight"
    out = accelerate_launch(one_gpu("bf16", *args(shards64, straight, steps=24, **det)), num_processes=1, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    run_dir = tmp_path / "killed"
    proc = start(["--mixed_precision", "bf16", *args(shards64, run_dir, steps=24, **det)], num_processes=1)
    wait_for(lambda: last_step(run_dir) >= 10, proc, timeout=300, what="step 10")
    kill_group(proc)
    out = accelerate_launch(one_gpu("bf16", *args(shards64, run_dir, steps=24, **det)), num_processes=1, timeout=400)
    assert out.returncode == 0 and "resuming from" in out.stdout, out.stderr[-4000:]
    assert_close_traces(train_rows(run_dir), train_rows(straight), 1e-4, "kill -9 + resume vs straight")


@gpu
def test_loader_hands_over_pinned_batches(shards64):
    from dcgan_dist.config import load_config
    from dcgan_dist.data import stream
    from dcgan_dist.data.shards import ShardSet
    from dcgan_dist.dist.setup import loader_workers

    workers = loader_workers(None, torch.device("cuda"))
    assert workers >= 1
    cfg = load_config(None, ["data.batch_size=32", "data.shuffle_buffer=64"])
    batches = stream.batches(ShardSet.open(shards64), cfg, stream.Placement(0, 1, workers))
    try:
        images, _ = next(batches)
        assert images.is_pinned() and images.dtype == torch.uint8
        on_gpu = images.to("cuda", non_blocking=True)
        assert torch.equal(on_gpu.cpu(), images)
    finally:
        batches.close()


@gpu
def test_two_ranks_share_one_gpu_over_gloo(shards64, tmp_path):
    if torch.cuda.device_count() > 1:
        pytest.skip("needs ranks to outnumber GPUs")
    run_dir = tmp_path / "run"
    out = accelerate_launch(["--mixed_precision", "bf16", *args(shards64, run_dir, steps=10, **{"wandb.mode": "disabled"})],
                            num_processes=2,
                            timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "world_size=2" in out.stdout and "backend=gloo" in out.stdout and "cuda_graph=False" in out.stdout
    assert "2 ranks share 1 GPU(s)" in out.stderr
    replicas = json.loads((run_dir / "checkpoints/step-00000010/replicas.json").read_text())
    assert replicas["ranks"] == 2 and replicas["digest"]["0"] == replicas["digest"]["1"]


@gpu
def test_graph_captures_ddp_over_nccl(tmp_path):
    out = run([sys.executable, "tests/scripts/ddp_graph.py"], timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ddp"] and result["replays"] == result["expected_replays"] > 0   # 11 eager, 1 captured
    assert_close_traces(result["graph"], result["eager"], 2e-2, "DDP graph vs DDP eager")
