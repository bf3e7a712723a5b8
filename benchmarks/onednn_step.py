#!/usr/bin/env python
"""What oneDNN really runs for one bf16 training step on this CPU, convolution by convolution.

    python benchmarks/onednn_step.py [--threads 2] [--batch-size 128]

Runs the trainer's eager step (64 px, ngf = ndf = 64, bf16, channels_last, every pass on oneDNN's own
kernels) twice to warm up, then once with oneDNN's verbose mode on, and reads back every primitive it
executed: the kernel (for example `brg_conv_fwd:avx512_core_bf16`, or an `..._amx` one), the pass
(forward, backward data, backward weights), the layer's shape and the milliseconds. FLOPs come from the
shape, so each layer and each pass gets its TFLOP/s, set beside the dense 4096² matmul rate that the same
process reaches (and the matmul's own kernel). /proc/cpuinfo listing AMX does not mean oneDNN uses it;
this says which kernels did, and which of them fall short of the matmul. Beside each backward-weights
kernel it times the same gradient as one forward convolution, the form `train.cpu_forward_weight_grads`
gives the small-side layers.
Prints a table; the last line is JSON.
"""
import argparse
import contextlib
import ctypes
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from train_throughput import matmul_peak, warm_cpu_step  # benchmarks/ is this script's folder

from dcgan_dist.ops.cpu_conv import weight_grad_as_conv  # importable once train_throughput put the repo on sys.path

# onednn_verbose,v1,primitive,exec,cpu,<primitive>,<implementation>,<prop_kind>,...,<problem>,<ms>
EXEC = re.compile(r"^onednn_verbose,(?:v\d+,)?primitive,exec,cpu,(\w+),([^,]+),([^,]+),.*,([^,]+),([\d.]+)\s*$")
ISA = re.compile(r"^onednn_verbose,.*?,info,cpu,isa:(.+)$", re.M)
PASSES = {"forward_training": "forward", "forward_inference": "forward", "backward_data": "backward data",
          "backward_weights": "backward weights"}


@contextlib.contextmanager
def onednn_verbose(path: str):
    """oneDNN's verbose lines go to `path`: they are printed from C onto fd 1, past Python's sys.stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
    try:
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def dims(problem: str) -> dict[str, int]:
    """oneDNN's problem string, e.g. mb128_ic64oc128_ih32oh16kh4sh2dh0ph1_iw32..., as {"mb": 128, ...}."""
    return {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", problem)}


def conv_flops(primitive: str, problem: str) -> int:
    """Multiply-adds x 2 of a (de)convolution from oneDNN's problem string. The same count holds for its
    forward, backward-data and backward-weights passes."""
    d = dims(problem)
    spatial = d["ih"] * d["iw"] if primitive == "deconvolution" else d["oh"] * d["ow"]  # the conv side
    return 2 * d["mb"] * d["ic"] * d["oc"] * d["kh"] * d["kw"] * spatial // d.get("g", 1)


def parse(text: str) -> dict:
    """Per (primitive, pass, shape): the kernel, the calls and the ms; per pass: ms and TFLOP/s; reorders."""
    layers: dict[tuple, dict] = {}
    reorder_ms = 0.0
    for line in text.splitlines():
        m = EXEC.match(line)
        if not m:
            continue
        primitive, impl, prop, problem, ms = m.groups()
        if primitive == "reorder":
            reorder_ms += float(ms)
        if primitive not in ("convolution", "deconvolution"):
            continue
        row = layers.setdefault((primitive, PASSES.get(prop, prop), problem), {
            "primitive": primitive, "pass": PASSES.get(prop, prop), "shape": problem, "kernel": impl,
            "calls": 0, "ms": 0.0, "gflop": 0.0})
        row["calls"] += 1
        row["ms"] += float(ms)
        row["gflop"] += conv_flops(primitive, problem) / 1e9
    rows = sorted(layers.values(), key=lambda r: -r["ms"])
    passes: dict[str, dict] = {}
    for r in rows:
        r["tflops"] = round(r["gflop"] / r["ms"], 4) if r["ms"] else 0.0      # GFLOP per ms = TFLOP/s
        p = passes.setdefault(r["pass"], {"ms": 0.0, "gflop": 0.0})
        p["ms"] += r["ms"]
        p["gflop"] += r["gflop"]
    for p in passes.values():
        p["tflops"] = round(p["gflop"] / p["ms"], 3) if p["ms"] else 0.0
    kernels = sorted({r["kernel"] for r in rows})
    isa = ISA.search(text)
    return {"isa": isa.group(1).strip() if isa else None, "conv_kernels": kernels,
            "conv_uses_amx": any("amx" in k for k in kernels), "conv_ms": round(sum(r["ms"] for r in rows), 1),
            "reorder_ms": round(reorder_ms, 1), "passes": passes, "layers": rows}


def time_weight_grad_as_conv(row: dict, reps: int = 3) -> Optional[float]:
    """Best-of-`reps` ms of one `weight_grad_as_conv` call (what `train.cpu_forward_weight_grads` uses for
    small sides) for a backward-weights row's shape, bf16 channels_last, so that oneDNN's kernel can be
    set beside it on any CPU. A deconvolution's weight gradient is its equivalent convolution's, with
    input and output swapped."""
    d = dims(row["shape"])
    if d.get("g", 1) != 1 or d["sh"] != d["sw"] or d["ph"] != d["pw"]:
        return None
    big, small = (d["ic"], d["ih"], d["iw"]), (d["oc"], d["oh"], d["ow"])
    if row["primitive"] == "deconvolution":
        big, small = small, big
    x, g = (torch.randn(d["mb"], *side, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            for side in (big, small))
    if weight_grad_as_conv(x, g, d["sh"], d["ph"]).shape[-2:] != (d["kh"], d["kw"]):
        return None
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        weight_grad_as_conv(x, g, d["sh"], d["ph"])
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 2)


def measure(batch: int) -> dict:
    # oneDNN's own kernels for every pass, the small-side weight gradients included: the forward form the
    # trainer uses for those (train.cpu_forward_weight_grads) is timed beside them instead.
    step, sync = warm_cpu_step("bf16", batch, ("train.cpu_forward_weight_grads=false",))
    a = torch.randn(256, 256, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        log = str(Path(tmp) / "onednn.log")
        with onednn_verbose(log):
            step(2)
            sync()
            a @ a                           # which kernel a bf16 matmul gets, for comparison
        text = Path(log).read_text(errors="replace")
    result = parse(text)
    for row in result["layers"]:
        if row["pass"] == "backward weights":
            row["as_conv_ms"] = time_weight_grad_as_conv(row)
    mm = re.search(r"primitive,exec,cpu,matmul,([^,]+),", text)
    result["matmul_kernel"] = mm.group(1) if mm else None
    result["matmul_tflops"] = {str(t).split(".")[1]: round(matmul_peak("cpu", t, reps=1) / 1e12, 3)
                               for t in (torch.bfloat16, torch.float32)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.batch_size)
    peak = r["matmul_tflops"]["bfloat16"]
    print(f"oneDNN: {r['isa']}; threads {torch.get_num_threads()}; bf16 matmul {peak} TFLOP/s "
          f"({r['matmul_kernel']}), fp32 {r['matmul_tflops']['float32']}")
    print(f"one bf16 step, batch {args.batch_size}: convolutions {r['conv_ms']} ms, weight reorders "
          f"{r['reorder_ms']} ms; by pass: " + ", ".join(
              f"{k} {v['ms']:.0f} ms at {v['tflops']} TFLOP/s" for k, v in r["passes"].items()))
    print("as conv: the same weight gradient computed as one forward convolution over the batch")
    print(f"{'primitive':<13} {'pass':<16} {'shape':<58} {'calls':>5} {'ms':>7} {'ms/call':>7} {'TFLOP/s':>7} "
          f"{'of mm':>5} {'as conv':>7}  kernel")
    for row in r["layers"]:
        alt = row.get("as_conv_ms")
        print(f"{row['primitive']:<13} {row['pass']:<16} {row['shape']:<58} {row['calls']:>5} {row['ms']:>7.1f} "
              f"{row['ms'] / row['calls']:>7.1f} {row['tflops']:>7.3f} {row['tflops'] / peak:>5.0%} "
              f"{alt if alt is not None else '':>7}  {row['kernel']}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
