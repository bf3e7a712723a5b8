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
import signal
import sys
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan_dist.errors import RunStopped


def iter_tar(path: str, on_error: Callable[[str, Exception], None]) -> Iterator[dict]:
    """Samples of one shard, as webdataset groups them: {'__key__', 'jpg', 'json', ...}.

    A truncated or corrupt tar ends that shard early; `on_error` is told, and the stream goes on.
    """
    def handler(exc: Exception) -> bool:
        on_error(path, exc)
        return True

    try:
        f = open(path, "rb")
    except OSError as exc:
        on_error(path, exc)
        return
    with f:
        yield from wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander([{"url": path, "stream": f}], handler=handler), handler=handler)


def stream_shards(shards: list[str], num_streams: int, stream_id: int) -> list[str]:
    """This stream's own shards; with more streams than shards, every stream resamples all of them."""
    own = shards[stream_id::num_streams]
    return own if own else list(shards)


class BatchStream(IterableDataset):
    """Yields (images, bad) forever: images (batch_size, 3, R, R) uint8, and the count of unreadable
    samples or shard errors met since the previous batch. See the module docstring for the ordering."""

    MAX_WARNINGS = 5

    def __init__(self, shards: list[str], batch_size: int, resolution: int, seed: int, rank: int,
                 world_size: int, num_workers: int, shuffle_buffer: int = 2000, start_step: int = 0):
        super().__init__()
        self.shards, self.batch_size, self.resolution = list(shards), batch_size, resolution
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_roles = max(1, num_workers)
        self.shuffle_buffer, self.start_step = shuffle_buffer, start_step
        self.bad = self.warned = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.start_step) % self.num_roles
        stream_id = self.rank * self.num_roles + role
        shards = stream_shards(self.shards, self.world_size * self.num_roles, stream_id)
        rng = np.random.default_rng([self.seed, self.rank, role])
        samples = self._samples(shards, rng)
        skip = max(0, -(-(self.start_step - role) // self.num_roles))  # ceil((start - role) / roles)
        for _ in range(skip * self.batch_size):
            next(samples)
        self.bad = 0                      # problems met while skipping were counted by the first run
        while True:
            images = self._decode_batch(samples)
            bad, self.bad = self.bad, 0
            yield images, bad

    def _problem(self, what: str) -> None:
        self.bad += 1
        self.warned += 1
        if self.warned <= self.MAX_WARNINGS:
            more = " (further warnings from this stream suppressed)" if self.warned == self.MAX_WARNINGS else ""
            print(f"warning: {what}{more}", file=sys.stderr, flush=True)

    def _samples(self, shards: list[str], rng: np.random.Generator) -> Iterator[bytes]:
        """Infinite JPEG bytes: shard order reshuffled every pass, then a bounded shuffle buffer."""
        buffer: list[bytes] = []
        on_error = lambda path, exc: self._problem(f"skipping unreadable data in shard {path}: {exc}")
        while True:
            read = 0
            for i in rng.permutation(len(shards)):
                for sample in iter_tar(shards[i], on_error):
                    if "jpg" not in sample:
                        continue
                    read += 1
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample["jpg"])
                        continue
                    j = int(rng.integers(len(buffer)))
                    yield buffer[j]
                    buffer[j] = sample["jpg"]
            if read == 0 and not buffer:  # a whole pass gave nothing: never spin forever on bad shards
                raise RunStopped(f"no readable samples in shards {', '.join(shards)}")
            if read == 0:
                yield from buffer         # every shard went bad mid-run: drain what is left, then stop
                buffer.clear()

    def _decode_batch(self, samples: Iterator[bytes]) -> torch.Tensor:
        out = torch.empty(self.batch_size, 3, self.resolution, self.resolution, dtype=torch.uint8)
        i = failures = 0
        while i < self.batch_size:
            data = next(samples)
            try:
                # PIL, not torchvision.io: torchvision 0.29 deprecates its decoders.
                img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            except (OSError, ValueError) as exc:
                self._problem(f"skipping undecodable image: {exc}")
                failures += 1
                if failures > 10 * self.batch_size:
                    raise RunStopped("shards hold mostly undecodable images; re-shard them") from None
                continue
            if img.shape != (self.resolution, self.resolution, 3):
                raise RunStopped(f"shard image is {img.shape[1]}x{img.shape[0]}, expected "
                                 f"{self.resolution}x{self.resolution}: shards and manifest disagree")
            out[i] = torch.from_numpy(img.copy()).permute(2, 0, 1)
            i += 1
        return out


def make_loader(shards: list[str], batch_size: int, resolution: int, seed: int,
                rank: int, world_size: int, num_workers: int, shuffle_buffer: int, start_step: int = 0,
                pin_memory: bool = False) -> DataLoader:
    ds = BatchStream(shards, batch_size, resolution, seed, rank, world_size, num_workers, shuffle_buffer,
                     start_step)
    # Its own generator: creating the iterator draws a base seed, which must not come from (and shift)
    # the global torch RNG that the training noise uses, or a resumed run would draw different noise.
    return DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed + 1000 * rank),
                      worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(_worker_id: int) -> None:
    # SIGTERM/SIGINT sent to the whole process group (Ctrl-C, scancel, kill -- -PGID) must reach the
    # training process, which stops at a step boundary with a checkpoint; a worker dying first would
    # crash it instead. The training process shuts the workers down itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def next_batch(batches: Iterator) -> tuple[torch.Tensor, int]:
    """next() that turns a RunStopped raised inside a loader worker back into a one-line RunStopped."""
    try:
        return next(batches)
    except RunStopped as exc:
        message = str(exc).strip().splitlines()[-1]
        raise RunStopped(message.split("RunStopped: ", 1)[-1]) from None


def stop_loader(batches: Iterator) -> None:
    """Stop a loader iterator's worker processes now, even while an exception still references it;
    left to garbage collection, interpreter exit can wait forever on a worker nobody has told to stop."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
