"""Usable cores: CPU affinity capped by the cgroup CPU quota that Docker's --cpus and Kubernetes'
limits.cpu set. The cgroup trees below are written in the kernel's own file formats; the last test
puts a real process in a real cgroup where this machine allows it."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ALL_CORES, ROOT, on_all_cores
from dcgan_dist.host import cgroup_cpu_quota, usable_cores


def tree(root: Path, self_cgroup: str, files: dict) -> tuple[Path, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    (root / "self").write_text(self_cgroup)
    return root / "fs", root / "self"


def test_v2_takes_the_tightest_quota_of_the_cgroup_and_its_parents(tmp_path):
    fs, me = tree(tmp_path, "0::/kubepods/pod1/box\n", {
        "fs/cpu.max": "max 100000",                            # a root has none; an unlimited one reads so
        "fs/kubepods/cpu.max": "max 100000",
        "fs/kubepods/pod1/cpu.max": "150000 100000",           # limits.cpu: 1500m
        "fs/kubepods/pod1/box/cpu.max": "max 100000"})
    assert cgroup_cpu_quota(fs, me) == 1.5


def test_inside_a_container_the_host_path_is_absent_and_the_mount_is_its_cgroup(tmp_path):
    fs, me = tree(tmp_path, "0::/system.slice/docker-ab12.scope\n", {"fs/cpu.max": "400000 100000"})
    assert cgroup_cpu_quota(fs, me) == 4.0                     # docker run --cpus 4


def test_v1_and_hybrid_layouts(tmp_path):
    fs, me = tree(tmp_path, "12:pids:/\n4:cpu,cpuacct:/docker/ab12\n0::/\n", {
        "fs/cpu,cpuacct/docker/ab12/cpu.cfs_quota_us": "300000",
        "fs/cpu,cpuacct/docker/ab12/cpu.cfs_period_us": "100000",
        "fs/unified/cgroup.procs": ""})
    assert cgroup_cpu_quota(fs, me) == 3.0
    (tmp_path / "fs/cpu,cpuacct/docker/ab12/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(fs, me) is None                    # -1: no quota


def test_no_quota_or_no_cgroups_leaves_the_affinity(tmp_path):
    fs, me = tree(tmp_path, "0::/\n", {"fs/cgroup.procs": ""})
    cores = len(os.sched_getaffinity(0))
    assert cgroup_cpu_quota(fs, me) is None and usable_cores(fs, me) == cores
    assert usable_cores(fs, tmp_path / "no-such-file") == cores
    fs, me = tree(tmp_path / "q", "0::/\n", {"fs/cpu.max": "50000 100000"})
    assert usable_cores(fs, me) == 1                           # half a CPU: one thread, never 0


def test_a_real_cgroup_quota_caps_the_threads_per_rank(tmp_path):
    cpu = Path("/sys/fs/cgroup/cpu")
    group = cpu / f"dcgan-dist-test-{uuid.uuid4().hex[:8]}"
    if len(ALL_CORES) < 2 or not (cpu / "cpu.cfs_quota_us").is_file():
        pytest.skip("needs 2 or more cores and a cgroup v1 cpu controller")
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup here: {exc}")
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")     # one CPU's worth of time

        def enter():
            on_all_cores()
            (group / "cgroup.procs").write_text(str(os.getpid()))

        code = "from dcgan_dist.dist.setup import cpu_threads; print(cpu_threads(None))"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "LOCAL_WORLD_SIZE": "1"}, preexec_fn=enter)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1"], (out.stdout, len(ALL_CORES))   # affinity alone says len(ALL_CORES)
    finally:
        group.rmdir()
