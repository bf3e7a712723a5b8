#!/usr/bin/env python
"""Peak memory of the demo job: every process it starts (launcher, ranks, loader workers, W&B).

    python benchmarks/demo_memory.py [--steps 300] [--shards data/shards/demo64] [key=value ...]

Runs the same command as `make demo` (2 gloo ranks, configs/demo.yaml) into a temporary run_dir and
samples /proc every 0.2 s. Reports the peak of the summed RSS over the whole process tree (what the
machine must hold, shared pages counted once per process, so an upper bound) and of the summed PSS
(shared pages split between their users). The target (issue 4) is a summed RSS of at most 2.5 GB.
The last line is JSON with `peak_rss_mb`.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def memory_kb(pid: int) -> tuple[int, int]:
    """(rss, pss) in kB; a process that just exited counts as 0."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0, 0
    fields = {ln.split()[0].rstrip(":"): int(ln.split()[1]) for ln in rollup[1:] if ln.split()[-1] == "kB"}
    return fields.get("Rss", 0), fields.get("Pss", 0)


def _label(pid: int) -> str:
    try:
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    prog = " ".join(Path(a).name for a in argv[:3] if not a.startswith("--"))
    return prog[:60] or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--shards", default="data/shards/demo64")
    p.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    args = p.parse_args()
    accelerate = Path(sys.executable).parent / "accelerate"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(accelerate), "launch", "--config_file", "configs/accelerate/cpu_2proc.yaml", "launch/train.py",
               "--config", "configs/demo.yaml", f"run_dir={tmp}/run", f"data.shards={args.shards}",
               f"train.steps={args.steps}", *args.overrides]
        env = {**os.environ, "WANDB_SILENT": "true"}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        peak_rss = peak_pss = peak_procs = 0
        per_process: dict[str, int] = {}
        t0 = time.time()
        while proc.poll() is None:
            rss = pss = 0
            pids = tree(proc.pid)
            for pid in pids:
                r, s = memory_kb(pid)
                rss, pss = rss + r, pss + s
                name = f"pid {pid}: {_label(pid)}"
                per_process[name] = max(per_process.get(name, 0), r)
            peak_rss, peak_pss, peak_procs = max(peak_rss, rss), max(peak_pss, pss), max(peak_procs, len(pids))
            time.sleep(0.2)
        err = proc.stderr.read()
        if proc.returncode != 0:
            sys.exit(f"error: the demo run failed (exit {proc.returncode}):\n{err[-2000:]}")
    wall = time.time() - t0
    print(f"demo, {args.steps} steps, {wall:.0f} s, up to {peak_procs} processes")
    print(f"peak summed RSS {peak_rss / 1024:.0f} MB, peak summed PSS {peak_pss / 1024:.0f} MB (target RSS <= 2560 MB)")
    for name, kb in sorted(per_process.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  {kb / 1024:7.0f} MB peak RSS  {name}")
    print(json.dumps({"peak_rss_mb": round(peak_rss / 1024), "peak_pss_mb": round(peak_pss / 1024),
                      "steps": args.steps, "processes": peak_procs, "seconds": round(wall)}))


if __name__ == "__main__":
    main()
