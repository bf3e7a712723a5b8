"""Two machines on loopback, for real: two launchers (the image's entry point, as a container runs it)
form one job of world size 4. Then the cluster faults: a machine killed, a second job on the same
run_dir, a stale lock, a full disk during a save. And the SLURM script, rendered and run."""
import json
import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import BIN, ROOT, launch_cmd, overrides, run
from test_faults import fp32_args, kill_group, start, wait_for, with_faults, workers
from dcgan_dist.report.wandb_file import config as wandb_config

PATH_ENV = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_keys(shards, run_dir, steps, **over) -> list[str]:
    keys = {"data.shards": shards, "run_dir": run_dir, "model.resolution": 32, "model.ngf": 8, "model.ndf": 8,
            "data.batch_size": 8, "data.num_workers": 0, "data.shuffle_buffer": 32, "train.steps": steps,
            "train.log_every": 2, "train.sample_every": 1000, "train.ckpt_every": 4, "train.keep_ckpts": 2,
            "train.num_samples": 4, "train.cpu_threads_per_rank": 1, "wandb.mode": "disabled", "eval.metrics": "",
            **over}
    return ["--config", "configs/demo.yaml", *overrides(keys)]


def start_machines(args: list[str], port: int, tmp: Path, tag: str, env: dict | None = None,
                   prefix: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    """Machine 0 and machine 1: `docker/entrypoint.sh ARGS` with the environment a container would get
    (plus `env`), each started under `prefix[rank]` if given (a command that then runs the rest)."""
    machines = []
    for rank in (0, 1):
        full_env = {**os.environ, **PATH_ENV, "NUM_MACHINES": "2", "MACHINE_RANK": str(rank),
                    "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": str(port), "GPUS_PER_MACHINE": "0",
                    "MIXED_PRECISION": "no", **(env or {})}
        out, err = (open(tmp / f"{tag}-machine{rank}.{s}", "w+") for s in ("out", "err"))
        cmd = [*(prefix or {}).get(rank, []), str(ROOT / "docker/entrypoint.sh"), *map(str, args)]
        machines.append(subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=err, text=True,
                                         start_new_session=True))
    return machines


def logs(tmp: Path, tag: str, rank: int) -> tuple[str, str]:
    return tuple((tmp / f"{tag}-machine{rank}.{s}").read_text() for s in ("out", "err"))


def job_processes(machines) -> list[psutil.Process]:
    procs = []
    for m in machines:
        try:
            procs += [psutil.Process(m.pid), *psutil.Process(m.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return procs


@pytest.fixture(scope="module")
def pair(shards32, tmp_path_factory):
    """Both machines, to the end of a short run."""
    tmp = tmp_path_factory.mktemp("pair")
    run_dir = tmp / "run"
    machines = start_machines(train_keys(shards32, run_dir, steps=8, **{"wandb.mode": "offline"}), free_port(), tmp,
                              "pair")
    codes = [m.wait(timeout=300) for m in machines]
    return run_dir, codes, [logs(tmp, "pair", r) for r in (0, 1)]


def test_two_launchers_form_one_job_of_world_size_4(pair):
    run_dir, codes, outputs = pair
    assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    banner = [ln for out, _ in outputs for ln in out.splitlines() if ln.startswith("dcgan-dist: world_size")]
    assert len(banner) == 1 and banner[0].startswith("dcgan-dist: world_size=4 "), banner   # rank 0 alone speaks
    assert "global_batch=32" in banner[0]
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["world_size"] == 4 and facts["num_machines"] == 2
    head = (run_dir / "config.yaml").read_text()
    assert "# world_size: 4\n" in head and "world_size" not in yaml.safe_load(head)   # a comment: it reloads
    assert not (run_dir / "LOCK").exists(), "the run_dir lock is released at exit"


def test_all_four_ranks_hold_identical_parameters(pair):
    run_dir = pair[0]
    replicas = json.loads((run_dir / "checkpoints/step-00000008/replicas.json").read_text())
    assert replicas["ranks"] == 4
    assert len(set(replicas["digest"].values())) == 1, replicas        # sha256 of every parameter, per rank


def test_one_wandb_run_not_one_per_machine(pair):
    run_dir = pair[0]
    runs = list(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    (run_file,) = runs[0].glob("run-*.wandb")
    assert wandb_config(run_file)["run"]["world_size"] == 4


@pytest.mark.parametrize("victim", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_killing_one_machine_stops_the_other_then_both_resume(shards32, tmp_path, victim):
    """kill -9 of a whole machine (launcher, ranks, workers). Machine 0 also hosts the rendezvous store
    and rank 0, which holds the run_dir lock: killing it leaves a stale lock for the rerun to detect.
    Machine 1 (slow-marked: test_faults kills one rank of a job, much the same) must also stop machine 0."""
    run_dir = tmp_path / "run"
    # The survivor's exit code: 4 (lost contact), or PREEMPTED_EXIT_CODE where set, as on Kubernetes.
    preempted = {"PREEMPTED_EXIT_CODE": "143"} if victim == 0 else {}
    machines = start_machines(train_keys(shards32, run_dir, steps=100000), free_port(), tmp_path, "long",
                              env=preempted)
    everything = []
    try:
        wait_for(lambda: (run_dir / "checkpoints/step-00000004/COMPLETE").is_file(), machines[0], timeout=180,
                 what="the first checkpoint")
        everything = job_processes(machines)
        kill_group(machines[victim])
        t0 = time.time()
        survivor = machines[1 - victim]
        survivor.wait(timeout=60)
        assert survivor.returncode == (143 if preempted else 4) and time.time() - t0 < 60
        _, alive = psutil.wait_procs(everything, timeout=30)
        assert not alive, f"left running: {[p.cmdline()[:4] for p in alive]}"
    finally:
        for m in machines:
            if m.poll() is None:
                kill_group(m)
    err = logs(tmp_path, "long", 1 - victim)[1]
    lost = [ln for ln in err.splitlines() if ln.startswith("error: lost contact with another rank")]
    assert len(lost) == 1, err[-3000:]                   # one line on the surviving machine's log
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file())
    last = int(saved[-1].split("-")[1])
    rerun = start_machines(train_keys(shards32, run_dir, steps=last + 2), free_port(), tmp_path, "rerun")
    codes = [m.wait(timeout=300) for m in rerun]
    out0, err0 = logs(tmp_path, "rerun", 0)
    assert codes == [0, 0], err0[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / saved[-1]}" in out0
    if victim == 0:                       # rank 0 died holding the lock: the rerun finds it stale
        assert "note: taking over a stale lock on run_dir" in err0 and "is gone" in err0, err0[-2000:]


def test_second_job_on_a_running_run_dir_stops_with_one_line(shards32, tmp_path):
    run_dir = tmp_path / "run"
    first = start(fp32_args(shards32, run_dir, steps=100000))
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), first, what="the first job's training")
        holder = workers(first)[0].pid
        t0 = time.time()
        second = run(launch_cmd(fp32_args(shards32, run_dir, steps=5), num_processes=1), timeout=120)
    finally:
        kill_group(first)
    assert second.returncode == 1 and time.time() - t0 < 60
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: run_dir '{run_dir}' is in use by a running job (host {socket.gethostname()}, "
                      f"pid {holder}, " + errors[0].split(f"pid {holder}, ", 1)[1]], second.stderr[-2000:]
    assert "stop that job or choose another run_dir" in errors[0]


def test_full_disk_during_a_save_stops_with_one_line_and_keeps_the_previous(shards32, tmp_path):
    run_dir = tmp_path / "run"
    args = fp32_args(shards32, run_dir, steps=9)
    out = run(launch_cmd(with_faults(args)), env={**os.environ, "DCGAN_FAULT_ENOSPC": "6"}, timeout=300)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-3000:]
    assert "could not write checkpoint 'step-00000006'" in errors[0] and "No space left on device" in errors[0]
    assert f"{run_dir / 'checkpoints/step-00000003'}" in errors[0]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000003"], names                 # nothing half-written left behind
    again = run(launch_cmd(args), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints/step-00000003'}" in again.stdout


def test_slurm_script_is_valid_bash_and_renders_one_launch_per_node():
    assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"], cwd=ROOT).returncode == 0
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu-a7,gpu-b2,gpu-b3,gpu-c1",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "4242"}
    out = run(["bash", "launch/slurm.sbatch", "--config", "configs/celeba64.yaml", "run_dir=/shared/runs/a b"],
              env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["node 0", "node 1", "node 2", "node 3"]
    for node, line in enumerate(lines):
        assert line.startswith(f"node {node}: export PET_RDZV_ID=dcgan-4242-0 ")
        # What srun runs on the node, as far as the entry point's dry run: the line it would launch.
        shown = run(["bash", "-c", line.split(": ", 1)[1]], env={**os.environ, "DRY_RUN": "1"}, timeout=30)
        assert shown.returncode == 0, shown.stderr
        launch = shown.stderr.strip().splitlines()[-1]
        assert launch.startswith("dcgan-dist: accelerate launch --config_file configs/accelerate/multi_node_c10d.yaml ")
        assert f"--machine_rank {node} " in launch and "--num_machines 4 " in launch and "--num_processes 32 " in launch
        assert "--main_process_ip gpu-a7 " in launch and "--mixed_precision bf16 " in launch
        assert launch.endswith("launch/train.py --config configs/celeba64.yaml run_dir=/shared/runs/a\\ b")


def test_slurm_script_on_cpu_nodes_starts_one_rank_per_node_with_all_its_cpus():
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "cpu-1,cpu-2,cpu-3",
           "SLURM_CPUS_PER_TASK": "16", "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"}
    env.pop("SLURM_GPUS_ON_NODE", None)
    out = run(["bash", "launch/slurm.sbatch", "--config", "configs/demo.yaml"], env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "3 node(s) x no GPU(s), 16 CPU(s) per node, rendezvous at cpu-1:29500, attempt 2" in out.stderr
    line = out.stdout.splitlines()[2].split(": ", 1)[1]
    assert "PET_RDZV_ID=dcgan-77-2 " in line           # a requeued attempt never meets the old store
    shown = run(["bash", "-c", line], env={**os.environ, "DRY_RUN": "1", "PATH": PATH_ENV["PATH"], "CUDA_VISIBLE_DEVICES": ""},
                timeout=30)
    launch = shlex.split(shown.stderr.strip().splitlines()[-1].removeprefix("dcgan-dist: "))
    flag = dict(zip(launch[2:launch.index("launch/train.py"):2], launch[3:launch.index("launch/train.py"):2]))
    assert flag["--config_file"] == "configs/accelerate/cpu_2proc.yaml" and flag["--num_processes"] == "3"
    assert flag["--machine_rank"] == "2" and flag["--rdzv_backend"] == "c10d" and flag["--rdzv_conf"] == "is_host=0"
    assert launch[-1] == "train.cpu_threads_per_rank=16"


def test_slurm_rendered_commands_run_as_one_c10d_job(shards32, tmp_path):
    """What srun would start on each node, started here: two launchers meeting through c10d."""
    run_dir = tmp_path / "run"
    env = {**os.environ, **PATH_ENV, "DRY_RUN": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "127.0.0.1",
           "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_ID": str(os.getpid()), "MAIN_PROCESS_PORT": str(free_port()),
           "MIXED_PRECISION": "no"}
    rendered = run(["bash", "launch/slurm.sbatch", *train_keys(shards32, run_dir, steps=4)], env=env, timeout=30)
    commands = [ln.split(": ", 1)[1] for ln in rendered.stdout.splitlines()]
    nodes = [subprocess.Popen(["bash", "-c", c], cwd=ROOT, env={**os.environ, **PATH_ENV}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for c in commands]
    results = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], results[0][1][-3000:]
    assert re.search(r"dcgan-dist: world_size=4 .*backend=gloo", results[0][0] + results[1][0])
    assert json.loads((run_dir / "run.json").read_text())["num_machines"] == 2
