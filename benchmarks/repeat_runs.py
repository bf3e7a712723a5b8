#!/usr/bin/env python
"""Exit-code reliability: N consecutive short 2-rank gloo runs must all exit 0.

    python benchmarks/repeat_runs.py --shards data/shards/demo64 --runs 20

gloo DDP jobs that exit with wrapped models still alive abort in ~4 of 10 runs ("terminate called
without an active exception", exit -6); this catches any regression of the shutdown order. Prints a table, then JSON as the last line.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(shards: str, run_dir: str, resolution: int) -> tuple[int, float]:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "launch/train.py", "--config", "configs/demo.yaml",
           f"data.shards={shards}", f"run_dir={run_dir}", f"model.resolution={resolution}", "model.ngf=8",
           "model.ndf=8", "data.batch_size=8", "data.shuffle_buffer=16", "train.steps=3", "train.log_every=1",
           "train.ckpt_every=3", "wandb.mode=offline", "eval.metrics="]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
    return out.returncode, time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    resolution = json.loads((Path(args.shards) / "manifest.json").read_text())["resolution"]
    codes = []
    print(f"{'run':>4} {'exit':>5} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            code, seconds = one_run(args.shards, f"{tmp}/run{i}", resolution)
            codes.append(code)
            print(f"{i + 1:>4} {code:>5} {seconds:>8.1f}", flush=True)
    print(json.dumps({"runs": args.runs, "exit_0": codes.count(0), "exit_codes": codes}))
    sys.exit(0 if all(c == 0 for c in codes) else 1)


if __name__ == "__main__":
    main()
