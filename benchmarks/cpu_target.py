#!/usr/bin/env python
"""Issue 11's CPU target: the plain command a new user types, against the peer, on the same cores.

    python benchmarks/cpu_target.py --shards data/shards/demo64 \
        [--peer-main /tmp/examples/dcgan/main.py --dataroot data/synthetic/celeba] [--cores 0,1]

Ours is `accelerate launch --num_processes 1 --mixed_precision bf16 launch/train.py` with
configs/celeba64.yaml (64 px, batch 128, ngf = ndf = 64), without `--cpu`, so the launcher exports
OMP_NUM_THREADS=1 and the trainer's own default must win it back. CUDA is hidden, so a GPU machine's
host CPU is measured too. Both jobs are pinned to --cores (default: 2 of them, the issue's host), and
both are timed in steady state: ours over steps N..2N from its own log, the peer by benchmarks/peer_dcgan.py.
The CPU's name and its bf16 matrix units (AMX, avx512_bf16) are printed beside the figures, since the
target (3x the peer) assumes AMX. /proc/cpuinfo listing AMX does not mean the convolutions use it, so a
probe on the same cores (benchmarks/onednn_step.py) also records the kernel and TFLOP/s of every
convolution in one bf16 step and the dense 4096² matmul rate in bf16 and fp32, and a profile of one bf16
step says where its time goes (convolutions against the rest). The last line is JSON.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from train_throughput import end_to_end  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0


def cpu_name_and_bf16_units() -> tuple[str, list[str]]:
    text = Path("/proc/cpuinfo").read_text()
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split())
    return (name.group(1).strip() if name else "unknown"), sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})


def _last_json(cmd: list[str], env: dict) -> dict:
    """Run a benchmark script from the repo root; its last line of JSON, or {"error": ...} if it failed."""
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def onednn_probe(threads: int, env: dict) -> dict:
    """What the CPU really runs (benchmarks/onednn_step.py): oneDNN's ISA, the kernel and TFLOP/s of every
    convolution in one bf16 step, and the matmul rate in bf16 and fp32, on these same cores."""
    return _last_json(["benchmarks/onednn_step.py", "--threads", str(threads)], env)


def step_profile(batch: int, env: dict) -> dict:
    """Where the bare bf16 step's time goes on these cores (train_throughput.py --profile)."""
    out = _last_json(["benchmarks/train_throughput.py", "--device", "cpu", "--profile", "--precisions", "bf16",
                      "--batch-size", str(batch), "--steps", "3"], env)
    return out.get("profile", out)


def ours(shards: str, steps: int, env: dict, keys: tuple[str, ...] = ()) -> dict:
    launcher = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "1",
                "--mixed_precision", "bf16"]
    ips, stdout = end_to_end(shards, steps, keys, launcher=launcher, env=env)
    threads = re.search(r"threads=(\d+)", stdout)
    return {"images_per_s": round(ips, 1), "threads": int(threads.group(1)) if threads else None,
            "steps": [steps, 2 * steps]}


def peer(main_py: str, dataroot: str, iterations: int, env: dict) -> dict:
    cmd = [sys.executable, "benchmarks/peer_dcgan.py", "--main", main_py, "--dataroot", dataroot,
           "--iterations", str(iterations)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: the peer failed ({out.returncode}): {out.stderr.strip()[-600:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="64 px shards (launch/shard.py --resolution 64)")
    p.add_argument("--peer-main", help="pytorch/examples dcgan/main.py; without it only ours is timed")
    p.add_argument("--dataroot", help="for the peer: a folder holding a folder of images")
    p.add_argument("--cores", help="CPU ids to pin both jobs to, e.g. 0,1 (default: the first 2 usable)")
    p.add_argument("--steps", type=int, default=10, help="N: ours is timed over steps N..2N")
    p.add_argument("--peer-iterations", type=int, default=15, help="the peer is timed over iterations N..2N")
    p.add_argument("--batch-size", type=int, default=128, help="ours and the profile (default 128, the target's; "
                                                              "smaller only to test this script quickly)")
    args = p.parse_args()
    if args.peer_main and not args.dataroot:
        p.error("--peer-main needs --dataroot")
    usable = sorted(os.sched_getaffinity(0))
    cores = [int(c) for c in args.cores.split(",")] if args.cores else usable[:2]
    os.sched_setaffinity(0, cores)  # the children inherit it, and our default reads it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "OMP_"))}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))

    name, units = cpu_name_and_bf16_units()
    print(f"cpu: {name}; bf16 units: {', '.join(units) or 'none'}; pinned to cores {cores}", flush=True)
    result = {"cpu": name, "bf16_units": units, "amx": "amx_bf16" in units, "cores": cores,
              "onednn": onednn_probe(len(cores), env)}
    dnn = result["onednn"]
    if "error" in dnn:
        print(f"oneDNN probe failed: {dnn['error']}", flush=True)
    else:
        mm = dnn["matmul_tflops"]
        kernels = sorted({k for ks in dnn["conv_kernels"] for k in ks.split("+")})
        print(f"oneDNN: {dnn['isa']}; bf16 conv kernels: {', '.join(kernels)}; 4096² matmul bf16 "
              f"{mm['bfloat16']} TFLOP/s ({dnn['matmul_kernel']}), fp32 {mm['float32']} "
              f"({mm['bfloat16'] / mm['float32']:.2f}x)", flush=True)
        print(f"convolutions of one bf16 step: {dnn['conv_ms']:.0f} ms; " + ", ".join(
            f"{k} at {v['tflops']} TFLOP/s" for k, v in dnn["passes"].items()), flush=True)
        if result["amx"] and not dnn["conv_uses_amx"]:
            print("note: /proc/cpuinfo lists AMX, but oneDNN did not use it for the convolutions", flush=True)
    result["profile"] = step_profile(args.batch_size, env)
    if "kinds" in result["profile"]:
        print(f"one bf16 step, {result['profile']['ms_per_step']:.0f} ms: "
              + ", ".join(f"{k} {v:.0%}" for k, v in result["profile"]["kinds"].items()), flush=True)
    batch = (f"data.batch_size={args.batch_size}",)
    result["ours"] = ours(args.shards, args.steps, env, batch)
    print(f"ours: {result['ours']['images_per_s']:,.1f} img/s, threads={result['ours']['threads']} "
          f"(steps {args.steps}..{2 * args.steps})", flush=True)
    # The same with oneDNN's own backward-weights kernels: whether the default's forward form pays here.
    plain = ours(args.shards, args.steps, env, (*batch, "train.cpu_forward_weight_grads=false"))
    result["ours_onednn_weight_grads"] = plain
    print(f"ours with train.cpu_forward_weight_grads=false: {plain['images_per_s']:,.1f} img/s (the default is "
          f"{result['ours']['images_per_s'] / plain['images_per_s'] - 1:+.1%})", flush=True)
    if args.peer_main:
        result["peer"] = peer(args.peer_main, args.dataroot, args.peer_iterations, env)
        result["ratio"] = round(result["ours"]["images_per_s"] / result["peer"]["images_per_s"], 2)
        verdict = "met" if result["ratio"] >= TARGET_RATIO else "missed"
        print(f"peer: {result['peer']['images_per_s']:,.1f} img/s; ours / peer = {result['ratio']}x "
              f"(target {TARGET_RATIO}x on an AMX host: {verdict}{'' if result['amx'] else ', and this CPU has no AMX'})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
