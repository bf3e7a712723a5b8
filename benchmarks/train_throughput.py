#!/usr/bin/env python
"""Training-step throughput, one process, 64x64, nz 100, ngf = ndf = 64 (the paper's nets).

    python benchmarks/train_throughput.py [--device cpu|cuda] [--steps N] [--batch-sizes 128,256,512]
        [--precisions bf16,fp16] [--variants legacy,eager,graph] [--channels-last both|on|off] [--compile]
    python benchmarks/train_throughput.py --end-to-end --shards data/shards/demo64 [--steps 10]
    python benchmarks/train_throughput.py --device cpu --profile [--batch-size 128] [--precisions bf16]

Bare mode times the trainer's own step (`StepRunner` over `TrainStep`: D step + G step) on a random uint8
batch, which is copied in from pinned host memory on CUDA as the loader's would be. Each variant is one
change on the way from the old step to the fast one, so every optimisation is measured on its own:

  legacy         the step before issue 11: Accelerate's optimizer wrappers and per-forward autocast,
                 `unwrap_model` every step, foreach Adam, `step_was_skipped` read every step (a sync)
  eager-nobench  the new sync-free step, fused Adam, but cuDNN autotuning off
  eager-foreach  the new step with foreach (unfused) Adam
  eager          the new step as the trainer runs it without a graph
  graph          the same step captured once as a CUDA graph and replayed (CUDA only)

Steady state: warm-up steps first (graph capture included), then `--steps` timed steps between two
device syncs. The extra variants run at the first batch size only. --end-to-end runs the real trainer
(loader, logging, everything) for 2N steps and reads the images/s it logged over steps N..2N.
--profile (CPU only) runs the eager step under torch.profiler and says where a step's time goes, by kind of op
(convolutions forward and backward, BatchNorm, the optimiser, the rest): on a CPU whose matrix unit
makes the convolutions cheap, the rest is what is left to win.
Prints a table; the last line is JSON.
"""
import argparse
import gc
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

ABLATION = ("legacy", "eager-nobench", "eager-foreach")


def _config(batch: int, channels_last: bool, keys: tuple[str, ...] = ()):
    from dcgan_dist.config import load_config

    return load_config(None, [f"data.batch_size={batch}", f"train.channels_last={channels_last}",
                              "wandb.mode=disabled", *keys])


def _new_runner(acc, variant: str, batch: int, channels_last: bool, compile_: bool, keys: tuple[str, ...] = ()):
    """The trainer's own step (trainer.build_nets + TrainStep), changed only as the variant says."""
    from dcgan_dist.dist.setup import autocast
    from dcgan_dist.train.step import TrainStep
    from dcgan_dist.train.trainer import build_nets

    cfg = _config(batch, channels_last, keys)
    graph = variant == "graph"
    torch.backends.cudnn.benchmark = variant != "eager-nobench"
    stream = torch.cuda.Stream(acc.device) if graph else None
    nets = build_nets(acc, cfg, stream)
    if compile_:
        nets.G, nets.D = torch.compile(nets.G), torch.compile(nets.D)
    if variant == "eager-foreach":
        for opt in (nets.opt_g, nets.opt_d):
            for group in opt.param_groups:
                group.update(fused=False, foreach=True)
    step = TrainStep(nets, cfg, autocast(acc), acc.scaler, stream)
    return step, lambda batch_u8, i: step(batch_u8, i, (i + 1) * batch), lambda: step.sums.tolist()


def _legacy_runner(acc, batch: int, channels_last: bool):
    """The pre-issue-11 step, kept here as the baseline: every call goes through Accelerate's wrappers."""
    from dcgan_dist.nets import losses
    from dcgan_dist.nets.models import build_models

    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    G, D = build_models(100, 64, 64, 64)
    if channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    stats = []

    def update(opt, loss):
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        return not opt.step_was_skipped

    def step(batch_u8, _i):
        D_local = acc.unwrap_model(D)
        real = batch_u8.to(acc.device, non_blocking=True).float().div_(127.5).sub_(1.0).contiguous(
            memory_format=layout)
        fake = G(torch.randn(real.shape[0], 100, device=acc.device))
        real_logits, fake_logits = D(real), D(fake.detach())
        loss_d = losses.d_bce(real_logits, fake_logits)
        update(opt_d, loss_d)
        D_local.requires_grad_(False)
        loss_g = losses.g_bce(D_local(fake))
        update(opt_g, loss_g)
        D_local.requires_grad_(True)
        stats[:] = [torch.stack([loss_d.detach(), loss_g.detach()])]

    return None, step, lambda: stats[0].tolist()


KINDS = (("conv backward", ("convolution_backward",)),   # before "conv forward": "aten::convolution" is in it
         ("conv forward", ("aten::convolution", "aten::_convolution", "mkldnn_convolution", "cudnn_convolution")),
         ("batch norm", ("batch_norm",)),
         ("optimiser", ("adam", "_foreach", "_fused")))


def _kind(op: str) -> str:
    return next((kind for kind, keys in KINDS if any(k in op for k in keys)), "other")


def random_batch(batch: int) -> torch.Tensor:
    """uint8 images in channels_last, as the loader hands them over."""
    return torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8).permute(0, 3, 1, 2)


def warm_cpu_step(precision: str, batch: int, keys: tuple[str, ...] = ()):
    """The trainer's eager CPU step on a random batch, after 2 warm-up steps (oneDNN's primitives are
    created and cached by then). Returns `step(i)` for steps 2, 3, ... and `sync()`."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision=precision)
    _, step, sync = _new_runner(acc, "eager", batch, True, False, keys)
    batch_u8 = random_batch(batch)
    for i in range(2):
        step(batch_u8, i)
    sync()
    return (lambda i: step(batch_u8, i)), sync


def profile_step(precision: str, batch: int, steps: int, top: int = 12) -> dict:
    """CPU self time per op over `steps` eager steps, per step, with each op's share and the shares by kind.
    CPU only: on CUDA the time is in kernels whose names these kinds do not know."""
    from torch.profiler import ProfilerActivity, profile

    step, sync = warm_cpu_step(precision, batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(2, 2 + steps):
            step(i)
        sync()
    ops = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    ops = sorted((o for o in ops if o[1] > 0), key=lambda o: -o[1])
    total = sum(ms for _, ms in ops)
    kinds: dict[str, float] = {}
    for op, ms in ops:
        kinds[_kind(op)] = kinds.get(_kind(op), 0.0) + ms
    return {"precision": precision, "batch": batch, "steps": steps, "ms_per_step": round(total, 1),
            "kinds": {k: round(ms / total, 3) for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "ops": [{"op": op, "ms_per_step": round(ms, 2), "share": round(ms / total, 3)} for op, ms in ops[:top]]}


def bare(device: str, precision: str, variant: str, batch: int, channels_last: bool, compile_: bool,
         steps: int) -> dict:
    from accelerate import Accelerator

    acc = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    if variant == "legacy":
        keep, step, sync = _legacy_runner(acc, batch, channels_last)
    else:
        keep, step, sync = _new_runner(acc, variant, batch, channels_last, compile_)
    batch_u8 = random_batch(batch)
    if device == "cuda":
        batch_u8 = batch_u8.pin_memory()             # what the loader hands over
        torch.cuda.reset_peak_memory_stats()
    warmup = 15 if device == "cuda" else 2           # graph: 3 eager + capture, then replays
    for i in range(warmup):
        step(batch_u8, i)
    sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(batch_u8, i)
    sync()
    seconds = time.perf_counter() - t0
    row = {"precision": precision, "variant": variant, "batch": batch, "channels_last": channels_last,
           "compile": compile_, "images_per_s": round(steps * batch / seconds, 1),
           "ms_per_step": round(1000 * seconds / steps, 3)}
    if device == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del keep, step, sync
    gc.collect()
    return row


def grid(args) -> list[tuple]:
    """(precision, variant, batch, channels_last, compile) for every row to time."""
    cl = {"both": (False, True), "on": (True,), "off": (False,)}[args.channels_last]
    rows = []
    for precision, variant, batch, c, comp in itertools.product(
            args.precisions, args.variants, args.batch_sizes, cl, (False, True) if args.compile else (False,)):
        if variant == "graph" and (args.device != "cuda" or comp):
            continue
        if variant in ABLATION and (batch != args.batch_sizes[0] or comp):
            continue                             # the ablation runs at one batch size ...
        if variant in ABLATION[1:] and precision != args.precisions[0]:
            continue                             # ... and one precision, bar the legacy baseline
        rows.append((precision, variant, batch, c, comp))
    return rows


def _in_subprocess(args, rows: list[tuple]) -> list[dict]:
    """Accelerate's state is a per-process singleton: one precision per process."""
    cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
           "--single", json.dumps(rows)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed for {rows}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def flops_per_image(batch: int = 16) -> float:
    """Conv and matmul FLOPs of one step (D step + G step, forward and backward), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from accelerate import Accelerator

    from dcgan_dist.dist.setup import autocast
    from dcgan_dist.train.step import TrainStep
    from dcgan_dist.train.trainer import build_nets

    acc = Accelerator(cpu=True)
    cfg = _config(batch, False)
    step = TrainStep(build_nets(acc, cfg), cfg, autocast(acc), acc.scaler)
    with FlopCounterMode(display=False) as counter:
        step(torch.zeros(batch, 3, 64, 64, dtype=torch.uint8), 0, batch)
    return counter.get_total_flops() / batch


def matmul_peak(device: str, dtype: torch.dtype, reps: int = 5) -> float:
    """Dense GEMM FLOP/s in `dtype`: what this device can really do, the yardstick for a conv net."""
    n = 8192 if device == "cuda" else 4096
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


def end_to_end(shards: str, steps: int, keys: list[str] = (), launcher: list[str] = (sys.executable,),
               env: dict | None = None) -> tuple[float, str]:
    """The real trainer (configs/celeba64.yaml, `keys` on top) started by `launcher` for 2N steps: the
    img/s it logged over steps N..2N, and its stdout."""
    env = env or {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*launcher, "launch/train.py", "--config", "configs/celeba64.yaml", f"data.shards={shards}",
               f"run_dir={tmp}/run", f"train.steps={2 * steps}", f"train.log_every={steps}",
               "train.sample_every=100000", "train.ckpt_every=100000", "wandb.mode=disabled", "eval.metrics=",
               *keys]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"error: the trainer failed ({out.returncode}): {out.stderr.strip()[-600:]}")
        rows = [json.loads(ln) for ln in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "images_per_s" in r][-1]["images_per_s"], out.stdout


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, help="timed steps per row (default: 300 on CUDA, 5 on CPU)")
    p.add_argument("--batch-sizes", type=_csv(int), help="per-process batches (default: 128,256,512 on CUDA)")
    p.add_argument("--batch-size", type=int, help="one batch size (same as --batch-sizes N)")
    p.add_argument("--precisions", type=_csv(str), help="no,bf16,fp16 (default: bf16,fp16 on CUDA; no,bf16 on CPU)")
    p.add_argument("--variants", type=_csv(str), help="legacy,eager-nobench,eager-foreach,eager,graph")
    p.add_argument("--channels-last", choices=("both", "on", "off"))
    p.add_argument("--compile", action="store_true", help="also time torch.compile (eager variants)")
    p.add_argument("--end-to-end", action="store_true")
    p.add_argument("--shards")
    p.add_argument("--precision", default="bf16", help="for --end-to-end")
    p.add_argument("--num-workers", type=int, default=0, help="for --end-to-end: loader workers")
    p.add_argument("--profile", action="store_true", help="where one eager step's time goes, op by op")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == "cuda"
    if args.profile and gpu:
        p.error("--profile profiles the CPU step: add --device cpu")
    args.steps = args.steps or (300 if gpu else 5)
    if args.single:
        rows = [bare(args.device, *row, steps=args.steps) for row in json.loads(args.single)]
        print(json.dumps(rows))
        return
    args.batch_sizes = [args.batch_size] if args.batch_size else args.batch_sizes or ([128, 256, 512] if gpu else [128])
    args.precisions = args.precisions or (["bf16", "fp16"] if gpu else ["no", "bf16"])
    args.variants = args.variants or (["legacy", "eager-nobench", "eager-foreach", "eager", "graph"] if gpu
                                      else ["eager"])
    args.channels_last = args.channels_last or ("on" if gpu else "both")
    name = torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    if args.profile:
        prof = profile_step(args.precisions[0], args.batch_sizes[0], min(args.steps, 5))
        print(f"{prof['ms_per_step']:.1f} ms per step ({prof['precision']}, batch {prof['batch']}): "
              + ", ".join(f"{k} {v:.0%}" for k, v in prof["kinds"].items()))
        for o in prof["ops"]:
            print(f"  {o['op']:<44} {o['ms_per_step']:>9.2f} ms {o['share']:>6.1%}")
        print(json.dumps({"device": name, "torch": torch.__version__, "profile": prof}))
        return
    results = []
    if args.end_to_end:
        ips, _ = end_to_end(args.shards, args.steps, [f"data.num_workers={args.num_workers}",
                                                      f"train.mixed_precision={args.precision}"])
        results.append({"variant": "end-to-end", "precision": args.precision, "num_workers": args.num_workers,
                        "images_per_s": round(ips, 1)})
    else:
        rows = grid(args)
        for precision in args.precisions:
            results += _in_subprocess(args, [r for r in rows if r[0] == precision])
    report(args.device, name, results)


def report(device: str, name: str, results: list[dict]) -> None:
    flops = flops_per_image()
    dtypes = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {p: matmul_peak(device, dtypes[p]) for p in {r["precision"] for r in results}}
    for r in results:
        r["tflops"] = round(r["images_per_s"] * flops / 1e12, 3)
        r["fraction_of_matmul_peak"] = round(r["images_per_s"] * flops / peaks[r["precision"]], 4)
    print(f"step: {flops / 1e9:.2f} GFLOP per image (conv + matmul, forward + backward); dense matmul "
          "peak here: " + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in sorted(peaks.items())))
    print(f"{'precision':<9} {'variant':<14} {'batch':>5} {'ch_last':>7} {'compile':>7} {'img/s':>9} "
          f"{'ms/step':>8} {'TFLOP/s':>8} {'of peak':>7}")
    for r in results:
        print(f"{r['precision']:<9} {r['variant']:<14} {r.get('batch', '-'):>5} {str(r.get('channels_last', '-')):>7} "
              f"{str(r.get('compile', '-')):>7} {r['images_per_s']:>9.0f} {r.get('ms_per_step', 0):>8.2f} "
              f"{r['tflops']:>8.3f} {r['fraction_of_matmul_peak']:>7.1%}")
    print(json.dumps({"device": name, "torch": torch.__version__, "gflop_per_image": round(flops / 1e9, 3),
                      "matmul_peak_tflops": {p: round(v / 1e12, 3) for p, v in peaks.items()}, "results": results}))


if __name__ == "__main__":
    main()
