"""Faults with real processes and real signals: kill -9 of the whole job, of one rank, during a save;
SIGTERM; and exact resume compared with an uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, launch_cmd, overrides, saved_net
from conftest import read_metrics as metrics


def fp32_args(shards, run_dir, steps=24, **over):
    keys = {"data.shards": shards, "run_dir": run_dir, "model.resolution": 32, "model.ngf": 8,
            "model.ndf": 8, "data.batch_size": 8, "data.num_workers": 1, "data.shuffle_buffer": 32,
            "train.steps": steps, "train.log_every": 1, "train.sample_every": 1000, "train.ckpt_every": 3,
            "train.keep_ckpts": 2, "train.num_samples": 4, "wandb.mode": "disabled", "eval.metrics": "", **over}
    return ["--mixed_precision", "no", "launch/train.py", "--config", "configs/demo.yaml",
            *overrides(keys)]


def with_faults(args: list) -> list:
    """The same launch through tests/scripts/faults.py, which installs the DCGAN_FAULT_* hooks first."""
    return [FAULTS if a == "launch/train.py" else a for a in args]


FAULTS = "tests/scripts/faults.py"


def start(args, env=None, num_processes=2) -> subprocess.Popen:
    """Start a job (2 ranks unless told) in its own process group, so that kill -9 can take all of it at once."""
    return subprocess.Popen(launch_cmd(args, num_processes), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "WANDB_SILENT": "true", **(env or {})})


def wait_for(predicate, proc, timeout=120.0, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc={proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 the whole job at once, as a lost machine would: the launcher's group and every rank and
    loader worker (torchrun gives each rank a session of its own, so killpg alone misses them). The ranks
    go first: a rank that outlived its launcher by a moment would get the parent-death SIGTERM and save."""
    job = psutil.Process(proc.pid).children(recursive=True)
    for p in reversed(job):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(job, timeout=30)
    assert not alive, f"job processes survived kill -9: {alive}"


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training ranks under the launcher, by global rank (read from their environment). Their own
    DataLoader workers share the command line and environment, so take only the topmost ones."""
    out = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RANK" in child.environ() and "RANK" not in child.parent().environ():
                out[int(child.environ()["RANK"])] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            continue
    return out


def finish(args, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run(launch_cmd(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(straight):
    return metrics(straight)


def assert_same_ema(run_dir: Path, expected_dir: Path, step: int = 24) -> None:
    """The EMA generator at the end: restored exactly on every resume, it matches the straight run's."""
    import torch

    got, expected = (saved_net(d / f"checkpoints/step-{step:08d}", "ema") for d in (run_dir, expected_dir))
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.allclose(got[key].float(), expected[key].float(), atol=1e-5, rtol=0), key


def assert_same_trace(got: list[dict], expected: list[dict], note: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected], note
    for a, b in zip(got, expected):
        for key in ("loss_d", "loss_g", "d_real", "d_fake"):
            assert abs(a[key] - b[key]) <= 1e-5, f"{note}: step {a['step']} {key} {a[key]} != {b[key]}"


def test_kill9_whole_job_at_random_points_then_resume_exactly(shards32, tmp_path, uninterrupted, straight):
    seed = int(os.environ.get("DCGAN_TEST_SEED", time.time()))
    rng = random.Random(seed)
    kill_points = sorted(rng.sample(range(2, 22), 3))
    run_dir = tmp_path / "run"
    args = fp32_args(shards32, run_dir)
    for k in kill_points:
        proc = start(args)
        wait_for(lambda: last_step(run_dir) >= k, proc, what=f"step {k}")
        kill_group(proc)
    out = finish(args)
    assert "resuming from" in out.stdout
    assert_same_trace(metrics(run_dir), uninterrupted, f"kill points {kill_points} (DCGAN_TEST_SEED={seed})")
    assert_same_ema(run_dir, straight)


def test_kill9_during_checkpoint_write_keeps_previous(shards32, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    args = fp32_args(shards32, run_dir)
    proc = start(with_faults(args), env={"DCGAN_FAULT_SLOW_SAVE": "6:60"})   # hold the step-6 save half written
    half_done = run_dir / "checkpoints" / ".tmp-step-00000006"
    wait_for(lambda: (half_done / "rng-0.json").is_file(), proc, what="the step-6 save in progress")
    kill_group(proc)
    assert not (run_dir / "checkpoints/step-00000006").exists()
    assert (run_dir / "checkpoints/step-00000003/COMPLETE").is_file()
    out = finish(args)
    assert "resuming from" in out.stdout and "step-00000003" in out.stdout
    assert not half_done.exists()
    assert_same_trace(metrics(run_dir), uninterrupted, "kill during save")


def test_incomplete_and_corrupt_checkpoints_are_skipped_by_name(shards32, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    args = fp32_args(shards32, run_dir, steps=9)
    finish(args)                                   # leaves step-6 and step-9 (keep_ckpts=2)
    corrupt = run_dir / "checkpoints/step-00000009"
    model = corrupt / "nets.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    incomplete = run_dir / "checkpoints/step-00000012"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"half")
    out = finish(fp32_args(shards32, run_dir))
    assert f"skipping incomplete checkpoint {incomplete}" in out.stderr
    assert f"skipping unreadable checkpoint {corrupt} (rank 0: Unreadable: nets.safetensors does not match the " \
           "size and sha256 in COMPLETE" in out.stderr
    assert "resuming from" in out.stdout and "step-00000006" in out.stdout
    assert_same_trace(metrics(run_dir), uninterrupted, "corrupt checkpoint fallback")


def test_sigterm_on_one_rank_checkpoints_and_exits_0_then_resumes(shards32, tmp_path):
    run_dir = tmp_path / "run"
    args = fp32_args(shards32, run_dir, steps=100000, **{"train.ckpt_every": 100000})
    proc = start(args)
    wait_for(lambda: last_step(run_dir) >= 5, proc, what="step 5")
    workers(proc)[1].send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file()
    stopped_at = int(saved[0].name.split("-")[1])
    assert stopped_at >= 5 and f"stopped by signal at step {stopped_at}" in stderr
    out = finish(fp32_args(shards32, run_dir, steps=stopped_at + 3))
    assert f"step-{stopped_at:08d}" in out.stdout
    assert "instead of" not in out.stderr                 # same ranks, same precision: no change to state
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, stopped_at + 4))


def test_kill9_of_one_rank_fails_the_job_fast(shards32, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(fp32_args(shards32, run_dir, steps=100000))
    wait_for(lambda: last_step(run_dir) >= 3, proc, what="step 3")
    t0 = time.time()
    job = psutil.Process(proc.pid).children(recursive=True)
    workers(proc)[1].kill()
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode != 0 and time.time() - t0 < 60
    _, alive = psutil.wait_procs(job, timeout=30)          # no rank or loader worker left behind, hung
    assert not alive, f"left running after the job failed: {[p.cmdline()[:3] for p in alive]}"


def test_said_once_per_machine_through_a_marker_that_a_reused_pid_cannot_fake(tmp_path, monkeypatch):
    """A dead peer is reported once per machine: the first rank to exclusively create its launcher's
    marker speaks. A marker from an earlier process that had the same PID must not silence it, and
    the markers of launchers that are gone are swept, not left in /tmp."""
    import tempfile

    from dcgan_dist import errors

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("MASTER_PORT", "29555")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"{errors.MARKER_PREFIX}{gone.pid}-1-29555"
    earlier = tmp_path / f"{errors.MARKER_PREFIX}{os.getppid()}-1-29555"      # this launcher's PID, not its start
    stale.touch()
    earlier.touch()
    assert errors._first_on_this_machine()           # the first rank to ask speaks
    assert not errors._first_on_this_machine()       # the next one of the same launcher stays quiet
    assert not stale.exists() and earlier.exists()   # its launcher is gone / this PID is alive
    assert len(list(tmp_path.glob(errors.MARKER_PREFIX + "*"))) == 2


def test_kill9_of_the_launcher_stops_the_ranks_with_a_checkpoint(shards32, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(fp32_args(shards32, run_dir, steps=100000, **{"train.ckpt_every": 100000}))
    wait_for(lambda: last_step(run_dir) >= 3, proc, what="step 3")
    job = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()                                             # only the launcher: the ranks are orphans now
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(job, timeout=120)
    for p in alive:
        p.kill()
    assert not alive, "ranks kept training after their launcher was killed"
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (run_dir / "checkpoints" / saved[0] / "COMPLETE").is_file()
    assert int(saved[0].split("-")[1]) >= 3


@pytest.mark.slow
def test_twenty_consecutive_two_rank_runs_exit_0(shards32):
    out = subprocess.run([sys.executable, "benchmarks/repeat_runs.py", "--shards", str(shards32), "--runs", "20"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["exit_0"] == 20, out.stdout + out.stderr[-3000:]
