#!/usr/bin/env python
"""Steady-state images/s of the peer: pytorch/examples `dcgan/main.py`, run as it is, never copied.

    git clone https://github.com/pytorch/examples /tmp/examples      # or any copy of dcgan/main.py
    python benchmarks/peer_dcgan.py --main /tmp/examples/dcgan/main.py \
        --dataroot data/synthetic/celeba --iterations 30

The peer prints one line per iteration ("[epoch/n][i/len] Loss_D ..."); each line is timestamped as
it arrives. Steady state is N iterations over (T(2N) - T(N)), as for our own benchmarks, so start-up
and the first slow iterations cancel. The last line is JSON with `images_per_s`.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import time

LINE = re.compile(r"^\[\d+/\d+\]\[\d+/\d+\] Loss_D")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--main", required=True, help="path to pytorch/examples dcgan/main.py")
    p.add_argument("--dataroot", required=True, help="a folder of images, as its --dataset folder expects")
    p.add_argument("--iterations", type=int, default=30, help="N: time iterations N..2N")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-u", args.main, "--dataset", "folder", "--dataroot", args.dataroot,
               "--workers", str(args.workers), "--batchSize", str(args.batch_size), "--imageSize", "64",
               "--niter", "1000", "--outf", out]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        stamps = []
        for line in proc.stdout:
            if LINE.match(line):
                stamps.append(time.perf_counter())
                if len(stamps) > 2 * args.iterations:
                    break
        proc.kill()
        proc.wait()
    if len(stamps) <= 2 * args.iterations:
        sys.exit(f"error: the peer printed only {len(stamps)} iteration lines; is --main dcgan/main.py?")
    n = args.iterations
    ips = n * args.batch_size / (stamps[2 * n] - stamps[n])
    print(f"peer pytorch/examples dcgan, fp32, workers={args.workers}: {ips:.1f} img/s "
          f"(iterations {n}..{2 * n})")
    print(json.dumps({"images_per_s": round(ips, 1), "iterations": [n, 2 * n], "batch_size": args.batch_size,
                      "workers": args.workers}))


if __name__ == "__main__":
    main()
