#!/usr/bin/env python
"""What one evaluation costs each rank, by part: Inception features, FID and KID, SWD.

    python benchmarks/eval_cost.py [--images 32,256,500,1000] [--threads 1] [--repeats 3]

Training waits while every rank evaluates, so this is time taken from training. FID is timed two ways
on the same features: the covariance formula (two 2048 x 2048 eigensolves, whatever the image count)
and the path `metrics.fid_kid` takes below 2048 images (singular values of an n x n matrix); the table
also shows that the two agree. The features are random, not Inception's: the cost of the algebra
depends only on their shape. Inception is timed on random uint8 images at 64 px. One thread by default,
which is what each of two ranks gets on a 2-core box. Prints a table; the last line is JSON.

    python benchmarks/eval_cost.py --evaluate RUN_DIR [--shards S] [--num 1000] [--reals 1000]

instead times `launch/evaluate.py` itself, one rank, end to end (start-up, generation, Inception on every
fake and on the reals unless cached, the metrics), and gives its images/s per rank and what FID-50k
against the whole set (fid50k_full) costs on this device at that rate.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcgan_dist.nets import metrics  # noqa: E402


def best_of(repeats: int, fn):
    """(fastest seconds, its result): the least disturbed of a few runs."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        runs.append((time.perf_counter() - t0, value))
    return min(runs, key=lambda r: r[0])


def features(n: int, seed: int) -> torch.Tensor:
    """Non-negative, correlated 2048-d vectors, shaped like pool3 features."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0)) / 2048 ** 0.5
    return (torch.randn(n, 2048, generator=gen) @ mix).relu()


def measure(n: int, repeats: int) -> dict:
    real, fake = features(n, 1), features(n, 2) * 1.1
    t_cov, fid_cov = best_of(repeats, lambda: metrics.frechet_distance(*metrics.gaussian_stats(real),
                                                                       *metrics.gaussian_stats(fake)))
    t_fid, fid = best_of(repeats, lambda: metrics.fid_of_features(real, fake))
    t_kid, _ = best_of(repeats, lambda: metrics.kid(real, fake, subset_size=min(1000, n)))
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    t_swd, _ = best_of(repeats, lambda: metrics.swd(images, images.flip(0)))
    return {"images": n, "fid_covariance_s": round(t_cov, 3), "fid_s": round(t_fid, 4), "kid_s": round(t_kid, 4),
            "swd_s": round(t_swd, 3), "fid_relative_difference": abs(fid - fid_cov) / abs(fid_cov)}


def evaluate_rate(args) -> dict:
    """One real run of launch/evaluate.py; its rate counts the images it ran Inception on."""
    cmd = [sys.executable, str(ROOT / "launch/evaluate.py"), "--checkpoint", args.evaluate, "--num", str(args.num),
           "--metrics", "fid" if metrics.inception_path(None) else "swd", "--no-wandb", "--cpu-threads-per-rank", str(args.threads)]
    cmd += ["--shards", args.shards] if args.shards else []
    cmd += ["--reals", str(args.reals)] if args.reals else []
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"launch/evaluate.py failed:\n{done.stderr[-2000:]}")
    line = json.loads(done.stdout.strip().splitlines()[-1])
    proto = line["protocol"]
    reals_done = 0 if "cached features" in done.stderr else proto["num_reals"]
    rate = (proto["num_fakes"] + reals_done) / line["seconds"]
    full_reals = proto["num_reals"] if proto["full"] else None
    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "threads": args.threads,
            "fakes": proto["num_fakes"], "reals_computed": reals_done, "seconds": line["seconds"],
            "images_per_s_per_rank": round(rate, 2), "results": line["results"],
            "fid50k_full_seconds_one_rank": round((50000 + (full_reals or 0)) / rate, 1) if full_reals else None,
            "fid50k_seconds_one_rank_without_reals": round(50000 / rate, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="32,256,500,1000", help="comma-separated eval set sizes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--evaluate", metavar="CHECKPOINT", help="time launch/evaluate.py on this run or snapshot")
    p.add_argument("--shards", help="with --evaluate: the reals (default: the snapshot's)")
    p.add_argument("--num", type=int, default=1000, help="with --evaluate: fakes (default 1000)")
    p.add_argument("--reals", type=int, help="with --evaluate: the first N reals (default: the whole set)")
    args = p.parse_args()
    if args.evaluate:
        r = evaluate_rate(args)
        print(f"launch/evaluate.py on {r['device']}, {r['threads']} thread(s): {r['fakes']} fakes + "
              f"{r['reals_computed']} reals in {r['seconds']} s = {r['images_per_s_per_rank']} img/s per rank; "
              f"FID-50k: {r['fid50k_seconds_one_rank_without_reals']} s for the fakes on one rank"
              + (f", {r['fid50k_full_seconds_one_rank']} s with the whole set's reals" if r["fid50k_full_seconds_one_rank"]
                 else ""))
        print(json.dumps(r))
        return
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.images.split(",")]

    inception = metrics.load_inception(None, torch.device("cpu"))
    per_image_s = None
    if inception is not None:
        batch = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
        inception(batch[:2])                                                      # first-call set-up
        per_image_s = best_of(args.repeats, lambda: inception(batch))[0] / len(batch)

    print(f"threads {args.threads}, torch {torch.__version__}; Inception: "
          + (f"{per_image_s:.3f} s per image" if per_image_s else "not installed"))
    print(f"{'images':>6} {'FID covariance':>15} {'FID':>9} {'KID':>9} {'SWD':>7} {'FID agree':>10}")
    rows = [measure(n, args.repeats) for n in sizes]
    for r in rows:
        print(f"{r['images']:>6} {r['fid_covariance_s']:>14.3f}s {r['fid_s']:>8.4f}s {r['kid_s']:>8.4f}s "
              f"{r['swd_s']:>6.3f}s {r['fid_relative_difference']:>10.1e}")
    print(json.dumps({"threads": args.threads, "torch": torch.__version__, "inception_s_per_image": per_image_s,
                      "rows": rows}))


if __name__ == "__main__":
    main()
