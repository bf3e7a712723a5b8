#!/usr/bin/env python
"""Data-parallel scaling, modelled from one card's measured step time and an all-reduce cost model.

    python benchmarks/scaling_model.py --throughput train_throughput.json [--gpus 8]
        [--busbw-gbs 360] [--latency-us 25] [--inter-busbw-gbs 90] [--inter-latency-us 60]

One card cannot show N cards' scaling, so this computes it. Each step all-reduces D's gradients (after
the D step) and G's (after the G step), in fp32: the sizes come from the models themselves (25.4 MB per
step for the paper's nets). A ring all-reduce of S bytes over N ranks takes
`latency + S * 2 (N - 1) / N / busbw`, where busbw is the "bus bandwidth" that nccl-tests reports.
DDP overlaps part of that with the backward pass; the model assumes it overlaps none, so the
efficiencies below are floors. Efficiency = t_step / (t_step + t_allreduce), with t_step the measured
single-card step (the fastest variant at each batch in the --throughput JSON).

The bandwidth and latency defaults are assumptions, not measurements made here: typical nccl-tests
all_reduce figures for 8 H100 SXM on NVSwitch at 10-15 MB messages (intra), and for 2 such nodes over
8 x 400 Gb/s InfiniBand (inter). Pass your cluster's own. Prints a table; the last line is JSON.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gradient_bytes(nz: int = 100, ngf: int = 64, ndf: int = 64, resolution: int = 64) -> dict:
    from dcgan_dist.nets.models import build_models

    G, D = build_models(nz, ngf, ndf, resolution)
    return {"G": 4 * sum(p.numel() for p in G.parameters()), "D": 4 * sum(p.numel() for p in D.parameters())}


def allreduce_s(size_bytes: int, ranks: int, busbw_gbs: float, latency_us: float) -> float:
    return latency_us * 1e-6 + size_bytes * 2 * (ranks - 1) / ranks / (busbw_gbs * 1e9)


def model(step_ms_by_batch: dict[int, float], grads: dict, ranks: int, busbw: float, latency: float) -> list[dict]:
    comm_s = sum(allreduce_s(size, ranks, busbw, latency) for size in grads.values())
    rows = []
    for batch, step_ms in sorted(step_ms_by_batch.items()):
        step_s = step_ms / 1000
        rows.append({"batch_per_gpu": batch, "step_ms": round(step_ms, 3), "allreduce_ms": round(comm_s * 1000, 3),
                     "efficiency": round(step_s / (step_s + comm_s), 4),
                     "images_per_s_total": round(ranks * batch / (step_s + comm_s))})
    return rows


def fastest_step_ms(throughput: dict, precision: str) -> dict[int, float]:
    best: dict[int, float] = {}
    for r in throughput["results"]:
        if r.get("precision") == precision and "batch" in r:
            best[r["batch"]] = min(best.get(r["batch"], float("inf")), r["ms_per_step"])
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--throughput", required=True, type=Path, help="train_throughput.py's JSON (its last line)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--gpus", type=int, default=8, help="ranks in one node")
    p.add_argument("--busbw-gbs", type=float, default=360.0, help="intra-node all_reduce bus bandwidth, GB/s")
    p.add_argument("--latency-us", type=float, default=25.0, help="intra-node all_reduce latency, us")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--inter-busbw-gbs", type=float, default=90.0, help="multi-node all_reduce bus bandwidth")
    p.add_argument("--inter-latency-us", type=float, default=60.0)
    args = p.parse_args()
    lines = args.throughput.read_text().strip().splitlines()
    step_ms = fastest_step_ms(json.loads(lines[-1]), args.precision)
    if not step_ms:
        raise SystemExit(f"{args.throughput}: no {args.precision} rows with a batch size")
    grads = gradient_bytes()
    setups = {f"1 node x {args.gpus}": model(step_ms, grads, args.gpus, args.busbw_gbs, args.latency_us),
              f"{args.nodes} nodes x {args.gpus}": model(step_ms, grads, args.nodes * args.gpus,
                                                        args.inter_busbw_gbs, args.inter_latency_us)}
    print(f"gradients per step: D {grads['D'] / 1e6:.1f} MB + G {grads['G'] / 1e6:.1f} MB (fp32)")
    print(f"{'setup':<14} {'batch/GPU':>9} {'step ms':>8} {'allred ms':>9} {'efficiency':>10} {'img/s total':>12}")
    for name, rows in setups.items():
        for r in rows:
            print(f"{name:<14} {r['batch_per_gpu']:>9} {r['step_ms']:>8.2f} {r['allreduce_ms']:>9.3f} "
                  f"{r['efficiency']:>10.1%} {r['images_per_s_total']:>12,}")
    keeps_90 = {name: next((r["batch_per_gpu"] for r in rows if r["efficiency"] >= 0.9), None)
                for name, rows in setups.items()}
    for name, batch in keeps_90.items():
        print(f"{name}: smallest measured batch per GPU keeping >= 90%: {batch or 'none of those measured'}")
    print(json.dumps({"gradient_mb": {k: round(v / 1e6, 2) for k, v in grads.items()},
                      "assumed": {"busbw_gbs": args.busbw_gbs, "latency_us": args.latency_us,
                                  "inter_busbw_gbs": args.inter_busbw_gbs, "inter_latency_us": args.inter_latency_us},
                      "setups": setups, "smallest_batch_for_90pct": keeps_90}))


if __name__ == "__main__":
    main()
