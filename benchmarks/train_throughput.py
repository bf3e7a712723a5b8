#!/usr/bin/env python
"""Training-step throughput, one process: precision x channels_last (x torch.compile with --compile).

    python benchmarks/train_throughput.py [--device cpu|cuda] [--batch-size 128] [--steps 10] [--compile]
    python benchmarks/train_throughput.py --end-to-end --shards data/shards/demo64 [--steps 10]

Bare mode times the real `train_step` (D step + G step) on random uint8 batches at 64x64, nz 100,
ngf = ndf = 64. Steady state is (T(2N) - T(N)) / N, which cancels start-up. --end-to-end runs the real
trainer (loader, logging, everything) for 2N steps and reads the images/s it logged over steps N..2N.
Prints a table; the last line is JSON.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bare(device: str, precision: str, channels_last: bool, compile_: bool, batch: int, steps: int) -> float:
    from accelerate import Accelerator

    from dcgan_dist.models import build_models
    from dcgan_dist.train.loop import train_step

    acc = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    G, D = build_models(100, 64, 64, 64)
    if channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    if compile_:
        G, D = torch.compile(G), torch.compile(D)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    nets = {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d}
    batch_u8 = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8)

    def run(n):
        for _ in range(n):
            stats, _, _ = train_step(acc, nets, batch_u8, 100, channels_last)
        stats.tolist()                                  # one sync at the end, as at a log step

    run(2)                                              # warm-up (and compilation)
    t0 = time.perf_counter()
    run(steps)
    t_n = time.perf_counter() - t0
    run(steps)
    t_2n = time.perf_counter() - t0
    return steps * batch / (t_2n - t_n)                 # N steps over (T(2N) - T(N))


def flops_per_image(batch: int = 16) -> float:
    """Conv and matmul FLOPs of one train_step (D step + G step, forward and backward), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from accelerate import Accelerator

    from dcgan_dist.models import build_models
    from dcgan_dist.train.loop import train_step

    acc = Accelerator(cpu=True)
    G, D = build_models(100, 64, 64, 64)
    nets = {"G": G, "D": D, "opt_g": acc.prepare(torch.optim.Adam(G.parameters())),
            "opt_d": acc.prepare(torch.optim.Adam(D.parameters()))}
    with FlopCounterMode(display=False) as counter:
        train_step(acc, nets, torch.zeros(batch, 3, 64, 64, dtype=torch.uint8), 100, False)
    return counter.get_total_flops() / batch


def matmul_peak(device: str, dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """Dense GEMM FLOP/s in `dtype`: what this device can really do, the yardstick for a conv net."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(3):                                  # best of 3: the peak, not a noisy mean
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return reps * 2 * n ** 3 / best


def _in_subprocess(args, precision: str, channels_last: bool, compile_: bool) -> float:
    """Accelerate's state is a per-process singleton: one precision per process."""
    cmd = [sys.executable, __file__, "--device", args.device, "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--single", precision, str(int(channels_last)), str(int(compile_))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def end_to_end(shards: str, steps: int, precision: str, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "launch/train.py", "--config", "configs/celeba64.yaml", f"data.shards={shards}",
               f"run_dir={tmp}/run", f"train.steps={2 * steps}", f"train.log_every={steps}",
               "train.sample_every=100000", "train.ckpt_every=100000", "wandb.mode=disabled",
               f"data.num_workers={workers}", f"train.mixed_precision={precision}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")})
        rows = [json.loads(ln) for ln in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    return rows[-1]["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--end-to-end", action="store_true")
    p.add_argument("--shards")
    p.add_argument("--precision", default="bf16", help="for --end-to-end")
    p.add_argument("--num-workers", type=int, default=0, help="for --end-to-end: loader workers")
    p.add_argument("--single", nargs=3, metavar=("PRECISION", "CHANNELS_LAST", "COMPILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        precision, cl, comp = args.single[0], args.single[1] == "1", args.single[2] == "1"
        print(bare(args.device, precision, cl, comp, args.batch_size, args.steps))
        return
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    results = []
    if args.end_to_end:
        ips = end_to_end(args.shards, args.steps, args.precision, args.num_workers)
        results.append({"mode": "end-to-end", "precision": args.precision, "num_workers": args.num_workers,
                        "images_per_s": round(ips, 1)})
    else:
        for precision, cl, comp in itertools.product(("no", "bf16"), (False, True),
                                                     (False, True) if args.compile else (False,)):
            ips = _in_subprocess(args, precision, cl, comp)
            results.append({"precision": precision, "channels_last": cl, "compile": comp,
                            "images_per_s": round(ips, 1)})
    flops = flops_per_image()
    peaks = {p: matmul_peak(args.device, {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[p])
             for p in {r["precision"] for r in results}}
    for r in results:
        r["tflops"] = round(r["images_per_s"] * flops / 1e12, 3)
        r["fraction_of_matmul_peak"] = round(r["images_per_s"] * flops / peaks[r["precision"]], 3)
    print(f"train_step: {flops / 1e9:.2f} GFLOP per image (conv + matmul, forward + backward); dense matmul "
          "peak here: " + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in sorted(peaks.items())))
    print(f"{'mode/precision':<16} {'ch_last':>8} {'compile':>8} {'img/s':>8} {'TFLOP/s':>8} {'of peak':>8}")
    for r in results:
        print(f"{r.get('mode', r['precision']):<16} {str(r.get('channels_last', '-')):>8} "
              f"{str(r.get('compile', '-')):>8} {r['images_per_s']:>8.0f} {r['tflops']:>8.3f} "
              f"{r['fraction_of_matmul_peak']:>8.0%}")
    print(json.dumps({"device": name, "gflop_per_image": round(flops / 1e9, 3),
                      "matmul_peak_tflops": {p: round(v / 1e12, 3) for p, v in peaks.items()}, "results": results}))


if __name__ == "__main__":
    main()
