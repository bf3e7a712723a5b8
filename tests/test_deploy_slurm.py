"""launch/slurm.sbatch on a real two-node Slurm cluster (`make test-deploy` starts one on loopback:
nodes n1 and n2, one CPU each). Skipped, with one line, where no cluster answers."""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_cluster import PATH_ENV, free_port, train_keys
from dcgan_dist.report.wandb_file import config as wandb_config

pytestmark = pytest.mark.deploy


def _cluster_idle_nodes() -> int:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for ln in out.stdout.splitlines() if ln.split()[1:] == ["idle"]) if out.returncode == 0 else 0


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if _cluster_idle_nodes() < 2:
        pytest.skip("no two-node Slurm cluster answers `sinfo` (tests/deploy/setup_host.sh starts one)")


def sbatch(args: list[str], out: Path) -> str:
    env = {**os.environ, **PATH_ENV, "MAIN_PROCESS_PORT": str(free_port()), "MIXED_PRECISION": "no"}
    done = subprocess.run(["sbatch", "--parsable", "--nodes", "2", "--output", str(out), "launch/slurm.sbatch",
                           *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=10)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_until(what: str, predicate, timeout: float, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log.exists() else "(no output file)"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; output:\n{tail}")


def state(job_id: str) -> str:
    return job(job_id).get("JobState", "")


def start_now(job_id: str) -> None:
    """A requeued job waits about two minutes (its BeginTime) before it may run again; a test need not,
    but it must wait two seconds. slurmd revokes the ended attempt's credential, and a credential
    created in the same second as that revocation counts as revoked (times are whole seconds): an attempt
    allocated at once is killed as "non-startable batch job: Job credential revoked" and never runs."""
    wait_until("the requeued job to be pending", lambda: state(job_id) == "PENDING", 60, Path("/dev/null"))
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"], check=True, timeout=10)


def test_two_node_job_trains_as_one_world_and_exits_0(shards32, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    t0 = time.time()
    job_id = sbatch(train_keys(shards32, run_dir, steps=8, **{"wandb.mode": "offline"}), log)
    wait_until("the job to finish", lambda: state(job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
               300, log)
    info, text = job(job_id), log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    print(f"\nslurm: a two-node job of 8 steps took {time.time() - t0:.0f} s from sbatch to COMPLETED")
    assert "dcgan-dist: 2 node(s) x no GPU(s), 1 CPU(s) per node, rendezvous at n1:" in text
    launches = [ln for ln in text.splitlines() if ln.startswith("dcgan-dist: accelerate launch")]
    assert len(launches) == 2 and all("--rdzv_backend c10d" in ln and "--main_process_ip n1" in ln for ln in launches)
    assert sorted(re.search(r"--rdzv_conf is_host=(\d)", ln).group(1) for ln in launches) == ["0", "1"]
    assert all("--num_processes 2 " in ln and "train.cpu_threads_per_rank=1" in ln for ln in launches)
    assert re.search(r"dcgan-dist: world_size=2 .*threads=1 .*backend=gloo", text), text[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["num_machines"] == 2
    runs = list(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs                                 # rank 0 logs, the other node stays quiet
    (run_file,) = runs[0].glob("run-*.wandb")
    assert wandb_config(run_file)["run"]["world_size"] == 2
    assert (run_dir / "checkpoints/step-00000008/COMPLETE").is_file()


def completed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                  if (p / "COMPLETE").is_file())


def test_scancel_term_checkpoints_then_requeue_and_the_time_limit_signal_resume(shards32, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job_id = sbatch(train_keys(shards32, run_dir, steps=100000, **{"train.ckpt_every": 100000, "wandb.mode": "offline"}),
                    log)
    try:
        # scancel --signal=TERM reaches every process of the job step, as preemption does.
        wait_until("training", lambda: "training:" in log.read_text() if log.exists() else False, 180, log)
        time.sleep(3)
        t0 = time.time()
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=10)
        wait_until("the job to end", lambda: state(job_id) not in ("RUNNING", "COMPLETING"), 120, log)
        print(f"\nslurm: scancel --signal=TERM to COMPLETED in {time.time() - t0:.1f} s")
        info, text = job(job_id), log.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
        assert text.count("dcgan-dist: stopped by SIGTERM, exit 0 (resumable") == 2, text[-3000:]   # both nodes
        (first,) = completed_steps(run_dir)

        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=10)
        start_now(job_id)
        resumed = f"resuming from {run_dir / 'checkpoints' / f'step-{first:08d}'}"
        wait_until("the requeued job to resume", lambda: resumed in log.read_text(), 180, log)
        wait_until("training after the resume", lambda: log.read_text().count("training:") >= 2, 60, log)
        time.sleep(3)

        # What Slurm sends this script before the time limit (#SBATCH --signal=B:USR1@180).
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=10)
        wait_until("the script to requeue itself", lambda: "requeueing job" in log.read_text(), 120, log)
        start_now(job_id)
        wait_until("a second resume", lambda: "resuming from" in log.read_text().partition("attempt 2")[2], 180, log)
        text = log.read_text()
        second = completed_steps(run_dir)[-1]
        assert second > first and f"resuming from {run_dir / 'checkpoints' / f'step-{second:08d}'}" in text
        assert "got SIGUSR1: stopping the job step with a checkpoint" in text
        for attempt in (0, 1, 2):                               # one output file, appended by each attempt
            assert f"attempt {attempt}" in text, text[-3000:]
        assert job(job_id)["Restarts"] == "2"
    finally:
        subprocess.run(["scancel", job_id], timeout=10)
