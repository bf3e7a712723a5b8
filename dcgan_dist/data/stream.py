"""Per-rank, per-worker infinite streams of uint8 image batches read from tar shards.

Why a hand-rolled IterableDataset instead of `accelerator.prepare(loader)` (see shared/PITFALLS.md):
  - progress is counted in steps, and every rank must get exactly the same number of batches or DDP
    hangs; an infinite resampled stream per rank makes that hold by construction;
  - each (rank, worker) "stream" owns a disjoint slice of the shards and a seed of its own, so the data
    seen is a pure function of (seed, rank, stream, step), and a resumed run can start at any step.

Batch b of a rank comes from stream role b % num_workers, because DataLoader hands out worker outputs
round robin. A run resumed at step s rotates the roles so that worker 0 plays role s % num_workers, and
each role skips the batches it produced before s, undecoded. That makes the batches after a resume
the same as those of an uninterrupted run.
"""
from __future__ import annotations

import io
import sys
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from PIL import Image


def iter_tar(path: str) -> Iterator[dict]:
    """Samples of one shard, as webdataset groups them: {'__key__', 'jpg', 'json', ...}."""
    def warn(exc: Exception) -> bool:
        print(f"warning: skipping unreadable data in shard {path}: {exc}", file=sys.stderr)
        return True

    with open(path, "rb") as f:
        yield from wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander([{"url": path, "stream": f}], handler=warn), handler=warn)


def stream_shards(shards: list[str], num_streams: int, stream_id: int) -> list[str]:
    """This stream's own shards; with more streams than shards, every stream resamples all of them."""
    own = shards[stream_id::num_streams]
    return own if own else list(shards)


def _samples(shards: list[str], rng: np.random.Generator, buffer_size: int) -> Iterator[bytes]:
    """Infinite stream of JPEG bytes: shard order reshuffled every pass, then a bounded shuffle buffer."""
    buffer: list[bytes] = []
    while True:
        for i in rng.permutation(len(shards)):
            for sample in iter_tar(shards[i]):
                if "jpg" not in sample:
                    continue
                if len(buffer) < buffer_size:
                    buffer.append(sample["jpg"])
                    continue
                j = int(rng.integers(len(buffer)))
                yield buffer[j]
                buffer[j] = sample["jpg"]


class BatchStream(IterableDataset):
    """Yields (batch_size, 3, R, R) uint8 tensors forever; see the module docstring for the ordering."""

    def __init__(self, shards: list[str], batch_size: int, resolution: int, seed: int, rank: int,
                 world_size: int, num_workers: int, shuffle_buffer: int = 2000, start_step: int = 0):
        super().__init__()
        self.shards, self.batch_size, self.resolution = list(shards), batch_size, resolution
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_roles = max(1, num_workers)
        self.shuffle_buffer, self.start_step = shuffle_buffer, start_step

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.start_step) % self.num_roles
        stream_id = self.rank * self.num_roles + role
        shards = stream_shards(self.shards, self.world_size * self.num_roles, stream_id)
        rng = np.random.default_rng([self.seed, self.rank, role])
        samples = _samples(shards, rng, self.shuffle_buffer)
        skip = max(0, -(-(self.start_step - role) // self.num_roles))  # ceil((start - role) / roles)
        for _ in range(skip * self.batch_size):
            next(samples)
        while True:
            yield self._decode_batch(samples)

    def _decode_batch(self, samples: Iterator[bytes]) -> torch.Tensor:
        out = torch.empty(self.batch_size, 3, self.resolution, self.resolution, dtype=torch.uint8)
        i = 0
        while i < self.batch_size:
            data = next(samples)
            try:
                # PIL, not torchvision.io: torchvision 0.29 deprecates its decoders.
                img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            except (OSError, ValueError) as exc:
                print(f"warning: skipping undecodable image in stream: {exc}", file=sys.stderr)
                continue
            if img.shape != (self.resolution, self.resolution, 3):
                raise ValueError(f"shard image is {img.shape[1]}x{img.shape[0]}, expected "
                                 f"{self.resolution}x{self.resolution}: shards and manifest disagree")
            out[i] = torch.from_numpy(img.copy()).permute(2, 0, 1)
            i += 1
        return out


def make_loader(shards: list[str], batch_size: int, resolution: int, seed: int,
                rank: int, world_size: int, num_workers: int, shuffle_buffer: int, start_step: int = 0,
                pin_memory: bool = False) -> DataLoader:
    ds = BatchStream(shards, batch_size, resolution, seed, rank, world_size, num_workers, shuffle_buffer,
                     start_step)
    return DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None, persistent_workers=False)
