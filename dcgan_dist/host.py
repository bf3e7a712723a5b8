"""What this host says about its processes: when one started, and how many cores this one may really
use (its CPU affinity, capped by its cgroup's CPU quota).

Affinity alone misleads in containers: a pod with `limits.cpu: 4` (or `docker run --cpus 4`) on a
64-core node sees 64 cores, and 64 threads throttled to 4 CPUs' worth of time run far slower than 4.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional


def process_start_ticks(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux); None if there is no such process, -1
    if /proc cannot tell. Two different processes that reuse one PID never share it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[19])


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else max(1, cores)


def cgroup_cpu_quota(root: Path, self_cgroup: Path) -> Optional[float]:
    """CPUs' worth of time the tightest quota on this process's cgroup or its parents allows (v2
    `cpu.max`, v1 `cpu.cfs_quota_us`), or None when there is none or it cannot be read."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":                                   # v2 (pure, or hybrid under unified/)
            mounts, read = [root, root / "unified"], _quota_v2
        elif "cpu" in controllers.split(","):
            mounts, read = [root / controllers, root / "cpu", root / "cpu,cpuacct"], _quota_v1
        else:
            continue
        for mount in dict.fromkeys(m for m in mounts if m.is_dir()):
            found = (_read_quota(read, folder) for folder in _cgroup_and_parents(mount, path))
            quotas += [q for q in found if q]
    return min(quotas) if quotas else None


def _cgroup_and_parents(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder and its parents up to the mount. Inside a container the path in
    /proc/self/cgroup is often the host's, absent here: the container's own cgroup is the mount's root."""
    here = mount / path.lstrip("/")
    if not here.is_dir():
        return [mount]
    return [here, *[p for p in here.parents if p == mount or mount in p.parents]]


def _read_quota(read: Callable[[Path], Optional[float]], folder: Path) -> Optional[float]:
    try:
        return read(folder)
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        return None


def _quota_v2(folder: Path) -> Optional[float]:
    quota, period = (folder / "cpu.max").read_text().split()[:2]           # "max 100000" or "400000 100000"
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(folder: Path) -> Optional[float]:
    quota = int((folder / "cpu.cfs_quota_us").read_text())                   # -1: no quota
    return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())


def children(pid: int) -> list[int]:
    """The PIDs whose parent is `pid` (Linux /proc; empty where it cannot be read)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue                # gone since the listing, or not ours to read
        if ppid == pid:
            found.append(int(entry.name))
    return found
