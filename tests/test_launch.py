"""Real `accelerate launch` with 2 gloo ranks on real shards, bf16, W&B offline read back from disk."""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ALL_CORES, accelerate_launch, on_all_cores, run, saved_net
from conftest import read_metrics as metrics
from dcgan_dist.report.wandb_file import config as wandb_config
from dcgan_dist.report.wandb_file import history, run_ids


def tiny(shards, run_dir, steps=12):
    return ["launch/train.py", "--config", "configs/demo.yaml", f"data.shards={shards}", f"run_dir={run_dir}",
            "model.resolution=32", "model.ngf=16", "model.ndf=16", "data.batch_size=16",
            "data.shuffle_buffer=64", f"train.steps={steps}", "train.log_every=4", "train.sample_every=6",
            "train.ckpt_every=6", "train.num_samples=16", "eval.num_images=32", "eval.every_kimg=0.192",
            "eval.batch_per_rank=8"]


@pytest.fixture(scope="module")
def trained(shards32, tmp_path_factory):
    """Two ranks, 12 steps, two evaluations; asked to log to W&B online with no key and no netrc, so it
    falls back to offline with one warning."""
    run_dir = tmp_path_factory.mktemp("run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(run_dir.parent / "home"), WANDB_SILENT="true")
    out = accelerate_launch([*tiny(shards32, run_dir), "wandb.mode=online"], timeout=400, env=env)
    return run_dir, out


def wandb_file(run_dir: Path) -> Path:
    """The run file of the first start (test_rerun_resumes_and_appends adds a second)."""
    return min(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_two_ranks_exit_0_and_write_run(trained):
    run_dir, out = trained
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("dcgan-dist: world_size=2") == 1          # rank 0 speaks, rank 1 is quiet
    assert f"threads={max(1, len(os.sched_getaffinity(0)) // 2)} " in out.stdout    # the cores, shared out
    assert "backend=gloo" in out.stdout and "mixed_precision=bf16" in out.stdout
    ckpt = run_dir / "checkpoints" / "step-00000012"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "nets.safetensors").is_file()
    assert (ckpt / "rng-1.json").is_file()                          # every rank's RNG is saved
    assert not list(ckpt.glob("*.pkl")) and not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pt"))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000012"]
    for name in ("reals.png", "fakes-00000000.png", "fakes-00000012.png", "real_vs_fake.png",
                 "loss_curves.png", "progress.gif"):
        assert (run_dir / "samples" / name).stat().st_size > 0, name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["ngf"] == 16 and "world_size" not in saved     # schema keys only: it reloads
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["world_size"] == 2 and facts["mixed_precision"] == "bf16" and facts["global_batch"] == 32
    assert (run_dir / "samples" / "raw-00000012.png").stat().st_size > 0      # the raw G beside the EMA


def test_saved_config_reloads_with_config_and_resumes(trained, shards32):
    run_dir, first = trained
    assert first.returncode == 0
    out = run([sys.executable, "launch/train.py", "--config", run_dir / "config.yaml", "train.steps=12",
               "wandb.mode=disabled"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already at step 12" in out.stderr


def test_metrics_are_finite_at_every_log_step(trained):
    rows = [r for r in metrics(trained[0]) if "loss_d" in r]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for r in rows:
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s", "time"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1 and r["images_per_s"] > 0
    assert rows[-1]["kimg"] == pytest.approx(12 * 32 / 1000)        # global batch = 2 ranks x 16


def test_wandb_offline_run_holds_losses_images_and_config(trained):
    run_dir, _ = trained
    rows = history(wandb_file(run_dir))
    logged = {r["_step"]: r["train/loss_d"] for r in rows if "train/loss_d" in r}
    expected = {r["step"]: r["loss_d"] for r in metrics(run_dir) if "loss_d" in r}
    assert logged.keys() == expected.keys()
    assert all(logged[s] == pytest.approx(expected[s], abs=1e-5) for s in expected)
    images = [r for r in rows if r.get("samples/fake", {}).get("_type") == "image-file"
              or r.get("samples/fake/_type") == "image-file"]
    assert len(images) >= 3
    cfg = wandb_config(wandb_file(run_dir))
    assert cfg["run"]["world_size"] == 2 and cfg["model"]["resolution"] == 32
    evals = {r["_step"]: r for r in rows if "eval/fid" in r or "eval/swd" in r}
    expected_eval = {r["step"]: r for r in metrics(run_dir) if "eval/swd" in r}
    assert sorted(evals) == sorted(expected_eval) == [6, 12]
    assert evals[12]["eval/swd"] == pytest.approx(expected_eval[12]["eval/swd"], abs=1e-4)
    report = {k for r in rows for k in r if k.startswith("report/")}       # the end-of-run pictures
    assert {"report/loss_curves", "report/real_vs_fake"} <= {k.split("/_type")[0] for k in report}, report


def test_parameters_identical_on_both_ranks(trained):
    replicas = json.loads((trained[0] / "checkpoints/step-00000012/replicas.json").read_text())
    assert replicas["ranks"] == 2
    assert replicas["digest"]["0"] == replicas["digest"]["1"]


def test_forward_form_weight_grads_keep_two_ranks_identical(shards32, tmp_path):
    """At ngf = ndf = 128, 32 px has the wide 4x4-side layers (D 256->512, G 512->256) that take the
    forward-form weight gradient on CPU: DDP must all-reduce what that custom backward returns."""
    out = accelerate_launch(["launch/train.py", "--config", "configs/demo.yaml", f"data.shards={shards32}",
                             f"run_dir={tmp_path}", "model.resolution=32", "model.ngf=128", "model.ndf=128",
                             "data.batch_size=8", "data.shuffle_buffer=64", "train.steps=4", "train.log_every=2",
                             "train.sample_every=100", "train.ckpt_every=4", "train.num_samples=4",
                             "eval.metrics="], timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "run.json").read_text())["cpu_forward_weight_grad_layers"] == 2
    replicas = json.loads((tmp_path / "checkpoints/step-00000004/replicas.json").read_text())
    assert replicas["ranks"] == 2 and replicas["digest"]["0"] == replicas["digest"]["1"]
    assert all(math.isfinite(r["loss_d"]) for r in metrics(tmp_path) if "loss_d" in r)


def test_replica_check_fails_on_a_real_mismatch(tmp_path):
    out = accelerate_launch(["tests/scripts/diverge.py", tmp_path], timeout=200)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("differs between rank") == 2


def test_rerun_resumes_and_appends(trained, shards32):
    run_dir, first = trained
    assert first.returncode == 0
    out = accelerate_launch(tiny(shards32, run_dir, steps=16), timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stdout and "step-00000012" in out.stdout
    assert [r["step"] for r in metrics(run_dir) if "loss_d" in r] == [4, 8, 12, 16]
    assert (run_dir / "checkpoints/step-00000016/COMPLETE").is_file()
    assert len({run_id for f in run_dir.glob("wandb/offline-run-*/run-*.wandb") for run_id in run_ids(f)}) == 1


def test_online_without_key_falls_back_to_offline(trained):
    run_dir, out = trained
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "wandb.mode=online but no API key" in warnings[0] and "offline" in warnings[0]
    assert len(history(wandb_file(run_dir))) >= 3


@pytest.mark.parametrize("override, needle", [
    ("model.resolution=64", "'model.resolution' is 64 but the shards"),
    ("data.batch_size=500", "'data.batch_size' is 500, larger than the 193 images"),
    ("data.shards=/nonexistent", "no such directory"),
    ("eval.num_images=1000", "'eval.num_images' is 1000, more than the 193 images"),
])
def test_bad_run_inputs_fail_fast_with_one_line(shards32, tmp_path, override, needle):
    out = run([sys.executable, *tiny(shards32, tmp_path / "run"), override], timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_one_cpu_rank_uses_every_core_under_plain_accelerate_launch(shards32, tmp_path):
    """`accelerate launch` without --cpu exports OMP_NUM_THREADS=1; the rank must not keep it."""
    out = accelerate_launch([*tiny(shards32, tmp_path / "run", steps=2), "wandb.mode=disabled", "eval.metrics="],
                            num_processes=1, timeout=300, preexec_fn=on_all_cores)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"threads={len(ALL_CORES)} " in out.stdout, out.stdout


def test_eval_rows_from_two_ranks_match_one_process_on_the_same_images(trained, shards32):
    """FID, KID and SWD as the 2-rank job logged them at step 12, recomputed here in one process from
    the EMA generator saved at that step, through the trainer's own evaluation."""
    from dcgan_dist.config import load_config
    from dcgan_dist.data.shards import ShardSet
    from dcgan_dist.dist.setup import build_eval_accelerator
    from dcgan_dist.nets import metrics as m
    from dcgan_dist.nets.models import build_models
    from dcgan_dist.train.trainer import periodic_evaluation

    run_dir, first = trained
    assert first.returncode == 0
    row = next(r for r in metrics(run_dir) if r["step"] == 12 and "eval/swd" in r)
    cfg = load_config(run_dir / "config.yaml")
    G, _ = build_models(cfg.model.nz, cfg.model.ngf, cfg.model.ndf, cfg.model.resolution)
    G.load_state_dict(saved_net(run_dir / "checkpoints/step-00000012", "ema"))
    cfg.run_dir = str(run_dir / "one-process")          # its own reals' cache, not the job's
    evaluation, _ = periodic_evaluation(build_eval_accelerator(), cfg, ShardSet.open(shards32))
    mine = evaluation.score(G)
    assert {f"eval/{k}" for k in mine} <= set(row)
    for key, value in mine.items():
        assert row[f"eval/{key}"] == pytest.approx(value, rel=2e-3, abs=1e-4), key
    assert 0 < row["eval/swd"] and (m.inception_path(None) is None or row["eval/fid"] > 0)


def test_best_checkpoint_follows_the_best_eval_and_survives_resume(trained):
    run_dir, first = trained
    assert first.returncode == 0
    best = run_dir / "checkpoints" / "best"
    assert (best / "COMPLETE").is_file() and saved_net(best, "ema")
    state = json.loads((best / "trainer_state.json").read_text())
    evals = [r for r in metrics(run_dir) if "eval/swd" in r]
    key = state["best"]["metric"]
    winner = min(evals, key=lambda r: r[f"eval/{key}"])
    assert state["best"]["step"] == winner["step"] == state["step"]
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    latest = json.loads((newest / "trainer_state.json").read_text())
    assert latest["best"] == state["best"]                       # carried by every checkpoint, so a resume keeps it
