"""The registry's metrics (FID, KID, SWD, precision and recall) of a generator during training, spread
over every rank.

The eval set is fixed: the shards' first `eval.num_images` images, and as many latents drawn from a
fixed seed. The latents are cut into batches of `eval.batch_per_rank`; batch j is generated on rank
j % world_size. Generation uses batch statistics (as the sample grids do), so fixing the batches, not
just the latents, is what makes the images, and so the metrics, the same at any world size.

Every rank then gathers all features and images and computes the same numbers: there is no step where
rank 0 computes alone while the others wait in a collective (torchmetrics' compute() is a collective,
and calling it on rank 0 alone hangs a job). The real side's Inception features are computed once per
shard set (its manifest digest), eval size and network (its sha256), and cached as safetensors next to the
shards (in the run folder when the shards are read-only or remote).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from tqdm import tqdm

from dcgan_dist import metrics
from dcgan_dist.config import Config, metric_list
from dcgan_dist.data.shards import ShardSet
from dcgan_dist.data.stream import first_images
from dcgan_dist.fsutil import atomic_write_bytes, file_sha256
from dcgan_dist.train import dist

EVAL_SEED_OFFSET = 1_000_003           # eval latents never coincide with the fixed sample grid's


class Evaluator:
    def __init__(self, accelerator: Accelerator, cfg: Config, shard_set: ShardSet, cache: Optional[Path] = None):
        self.acc, self.cfg, self.shard_set = accelerator, cfg, shard_set
        self.metrics = metric_list(cfg.eval.metrics)
        self.num, self.batch = cfg.eval.num_images, cfg.eval.batch_per_rank
        self.mine = list(range(accelerator.process_index, -(-self.num // self.batch), accelerator.num_processes))
        self.z = torch.randn(self.num, cfg.model.nz,
                             generator=torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET))
        self.inception = None
        if any(metrics.REGISTRY[m].needs_inception for m in self.metrics):
            self.inception = metrics.load_inception(cfg.eval.inception_weights, accelerator.device,
                                                    quiet=not accelerator.is_main_process)
        self.real_u8 = first_images(shard_set, self.num, cache)
        self.real_features = self._real_features() if self.inception is not None else None

    def best_metric(self) -> str:
        """eval.best_by, or the first headline metric in the registry's order that can be computed (fid
        when it can, else swd)."""
        if self.cfg.eval.best_by is not None:
            return self.cfg.eval.best_by
        can = [m.name for m in metrics.REGISTRY.values() if m.headline and m.name in self.metrics
               and (self.inception is not None or not m.needs_inception)]
        return can[0] if can else ""

    def __call__(self, G: torch.nn.Module) -> dict[str, float]:
        """Collective. {'fid', 'kid', 'swd', 'swd_<R>px', 'precision', 'recall'}: those of eval.metrics
        that can be computed."""
        device = self.acc.device
        fakes = {}
        bar = tqdm(total=len(self.mine) * self.batch, desc="evaluating", unit="img", leave=False,
                   disable=not self.acc.is_main_process, dynamic_ncols=True)
        for j in self.mine:
            fakes[j] = metrics.generate_u8(G, self.z[j * self.batch:(j + 1) * self.batch], self.batch, device)
            bar.update(len(fakes[j]))
        feats = {j: self.inception(x).cpu() for j, x in fakes.items()} if self.inception is not None else {}
        bar.close()
        inputs = metrics.Inputs(self.real_u8, dist.gather_batches(self.acc, fakes), self.real_features,
                                dist.gather_batches(self.acc, feats) if self.inception is not None else None)
        return metrics.compute(self.metrics, inputs)

    def _real_features(self) -> torch.Tensor:
        caches = cache_paths(self.shard_set, self.num, self.inception.source, self.cfg.run_dir)
        cached = cached_features(self.acc, caches, self.num)
        if cached is not None:
            return cached
        b = self.batch
        mine = {j: self.inception(self.real_u8[j * b:(j + 1) * b]).cpu() for j in self.mine}
        feats = dist.gather_batches(self.acc, mine)
        if self.acc.is_main_process:
            write_cache(feats, caches)
        return feats


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
    found = next((p for p in caches if p.is_file()), None)
    cached = _read_cache(found, num) if found is not None else None
    ok = dist.all_min(accelerator, torch.tensor([int(cached is not None)], device=accelerator.device))[0]
    return cached if ok else None


def _read_cache(path: Path, num: int) -> Optional[torch.Tensor]:
    """The cached features, or None (with a warning) when the file is not what it should be."""
    from safetensors.torch import load_file

    try:
        feats = load_file(str(path))["features"]
        if feats.dtype != torch.float32 or feats.shape[0] != num or feats.ndim != 2:
            raise ValueError(f"features of shape {tuple(feats.shape)}, expected ({num}, 2048) float32")
        return feats
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or altered: compute them again
        print(f"warning: ignoring the eval cache {path} ({type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
        return None


def write_cache(feats: torch.Tensor, caches: list[Path]) -> None:
    from safetensors.torch import save

    data = save({"features": feats.float().contiguous()})
    for path in caches:
        try:
            atomic_write_bytes(path, data)
            return
        except OSError as exc:
            print(f"warning: cannot cache real eval features at {path} ({exc.strerror})", file=sys.stderr)
