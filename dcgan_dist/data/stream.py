"""Per-rank, per-worker infinite streams of uint8 image batches read from tar shards of image blocks.

Why a hand-rolled IterableDataset instead of `accelerator.prepare(loader)`, which for an iterable
dataset either dispatches from rank 0 alone (the other ranks' shards are never read) or splits the data
a second time and throws some away:
  - progress is counted in steps, and every rank must get exactly the same number of batches or DDP
    hangs; an infinite resampled stream per rank makes that hold by construction;
  - each (rank, worker) "stream" owns a disjoint slice of the shards and a seed of its own, so the data
    seen is a pure function of (seed, rank, stream, step), and a resumed run can start at any step.

Workers hand over chunks of `chunk` consecutive batches, split back into batches in the training
process: each hand-over costs that process about 2 ms (shared memory and a file descriptor), which
capped a GPU rank at about 63k img/s whatever the worker count (docs/PERFORMANCE.md). Chunk c of a rank
comes from stream role c % num_workers, because DataLoader hands out worker outputs round robin. A run
resumed at step s starts in chunk c0 = s // chunk: it rotates the roles so that worker 0 plays role
c0 % num_workers, each role skips the chunks it produced before c0 without handing them out, and the
first s % chunk batches of chunk c0 are dropped here. That makes the batches after a resume the same
as those of an uninterrupted run.
"""
from __future__ import annotations

import io
import re
import signal
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan_dist.config import Config
from dcgan_dist.data import remote
from dcgan_dist.data.shards import NPY_HEADER_MAX, Shard, ShardSet, checked_bytes, fetch_shard
from dcgan_dist.errors import RunStopped, warn


class ShardError(ValueError):
    """Bytes that the shard format does not allow: the rest of that shard is skipped and counted."""


MEMBER = re.compile(r"^([^/\\\x00-\x1f.]{1,200})\.(npy|json)$")


def tar_members(f: BinaryIO, limits: dict[str, int]) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, data) of each member of one uncompressed tar stream. A compressed stream,
    anything but a regular .npy or .json file, or a member larger than `limits[ext]` raises ShardError
    before it is read: a hostile shard can cost no more memory than the format allows."""
    if f.peek(2)[:2] == b"\x1f\x8b":
        raise ShardError("gzip-compressed: shards are uncompressed tars")
    with tarfile.open(fileobj=f, mode="r|") as tar:        # "r|": no transparent decompression
        for info in tar:
            m = MEMBER.match(info.name)
            if m is None or not info.isfile():
                raise ShardError(f"member '{info.name[:80]}' is not a .npy or .json file of the shard format")
            key, ext = m.groups()
            if info.size > limits[ext]:
                raise ShardError(f"member '{info.name}' holds {info.size} bytes, more than a .{ext} member of "
                                 f"this set can ({limits[ext]})")
            yield key, ext, tar.extractfile(info).read()


def iter_tar(shard: Shard, limits: dict[str, int], on_error: Callable[[str, Exception], None],
             data: Optional[bytes] = None) -> Iterator[dict]:
    """The blocks of one shard, {'__key__', '__url__', 'npy', 'json'}, from its file or from `data`, its
    bytes already downloaded. A truncated, corrupt or malformed tar ends that shard early; `on_error` is
    told (with the shard's name as shown in messages), and the stream goes on."""
    sample: dict = {}
    try:
        with (open(shard.path, "rb") if data is None else io.BufferedReader(io.BytesIO(data))) as f:
            for key, ext, payload in tar_members(f, limits):
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample["__url__"] = shard.shown
                if ext in sample:
                    raise ShardError(f"member '{key}.{ext}' appears twice")
                sample[ext] = payload
    except (OSError, tarfile.TarError, ValueError) as exc:       # ShardError is a ValueError
        on_error(shard.shown, exc)
        return
    if sample:
        yield sample


def read_shards(shard_set: ShardSet, shards: list[Shard], on_error: Callable[[str, Exception], None],
                verify_local: bool = False) -> Iterator[dict]:
    """The samples of `shards` (of `shard_set`) in order. Remote shards (data/remote.py) are downloaded
    whole, a few ahead, by threads of this process (a loader worker, when there are workers), checked
    against their manifest entry and kept in the set's cache if it has one; one that still fails after its
    retries is reported to `on_error` and skipped. Local shards are read from disk as they are (training
    verified them at start), or, with `verify_local`, read whole and checked first."""
    limits = shard_set.member_limits()
    if not shard_set.remote:
        for shard in shards:
            if not verify_local:
                yield from iter_tar(shard, limits, on_error)
                continue
            try:
                data = checked_bytes(shard, Path(shard.path).read_bytes())
            except OSError as exc:
                on_error(shard.shown, exc)
                continue
            yield from iter_tar(shard, limits, on_error, data)
        return
    retry = lambda what: warn(what, mine=True)
    for shard, data in remote.fetch_ahead(shards, lambda s: fetch_shard(s, shard_set.cache, retry)):
        if isinstance(data, OSError):
            on_error(shard.shown, data)
        else:
            yield from iter_tar(shard, limits, on_error, data)


def decode_block(data: bytes, resolution: int) -> np.ndarray:
    """A block's .npy bytes as a read-only uint8 array (n, R, R, 3), without a copy. The header is
    checked against the bytes that follow it before anything is allocated: a header that claims more
    images than the member holds is a ShardError, not a MemoryError."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ShardError(f"npy format version {version}, expected 1.0 or 2.0")
        shape, fortran, dtype = read_header[version](f, max_header_size=NPY_HEADER_MAX)
    except ValueError as exc:                   # bad magic, or a header that is not a plain dict literal
        raise ShardError(f"not a .npy block ({exc})") from None
    r = resolution
    if dtype != np.uint8 or fortran or len(shape) != 4 or tuple(shape[1:]) != (r, r, 3):
        raise ShardError(f"a {dtype}{' Fortran-order' if fortran else ''} block of shape {tuple(shape)}, expected "
                         f"uint8 N x {r} x {r} x 3: shards and manifest disagree")
    if shape[0] * r * r * 3 != len(data) - f.tell():
        raise ShardError(f"the block's header claims {shape[0]} images but {len(data) - f.tell()} bytes follow it")
    return np.frombuffer(data, dtype=np.uint8, offset=f.tell()).reshape(shape)


def stream_shards(shards: list[Shard], num_streams: int, stream_id: int) -> list[Shard]:
    """This stream's own shards; with more streams than shards, every stream resamples all of them."""
    own = shards[stream_id::num_streams]
    return own if own else list(shards)


class ShufflePool:
    """A bounded shuffle buffer that works a batch at a time: `draw(n)` hands out the images in n random
    slots and refills those slots from the incoming blocks. Per image it costs two memcpys, and no
    Python at all, which is what lets one core feed a batch of 128 in well under a millisecond."""

    def __init__(self, blocks: Iterator[np.ndarray], capacity: int, rng: np.random.Generator):
        self.blocks, self.rng = blocks, rng
        self.block, self.pos = next(blocks), 0
        self.pool = self._take(capacity).copy()       # the first block may be a view; own the buffer

    def _take(self, n: int) -> np.ndarray:
        parts = []
        while n:
            if self.pos == len(self.block):
                self.block, self.pos = next(self.blocks), 0
            k = min(n, len(self.block) - self.pos)
            parts.append(self.block[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def draw(self, n: int, keep: bool = True) -> Optional[np.ndarray]:
        """n images (n, R, R, 3) in random order; with keep=False only the pool advances (for skipping)."""
        slots = self.rng.choice(len(self.pool), n, replace=False)
        out = self.pool[slots] if keep else None      # fancy indexing copies
        self.pool[slots] = self._take(n)
        return out


@dataclass(frozen=True)
class Placement:
    """Where a loader reads: its rank among `world` ranks, with `workers` loader processes (0: in the
    training process itself)."""

    rank: int
    world: int
    workers: int


class Stopped(NamedTuple):
    """What a stream yields, instead of a batch, when it cannot go on: typed data crosses the loader
    worker boundary, where an exception would arrive as the text of its traceback."""

    reason: str


class NoSamples(Exception):
    pass


class BatchStream(IterableDataset):
    """Yields (images, bad) forever: images (batch_size, 3, R, R) uint8 in channels_last memory, and the
    count of unreadable blocks or shard errors met since the previous batch; or one `Stopped`. See the
    module docstring for the ordering."""

    MAX_WARNINGS = 5

    def __init__(self, shard_set: ShardSet, cfg: Config, where: Placement, start_step: int, chunk: int):
        super().__init__()
        self.shard_set, self.where, self.start_step, self.chunk = shard_set, where, start_step, chunk
        self.batch_size, self.seed, self.shuffle_buffer = cfg.data.batch_size, cfg.seed, cfg.data.shuffle_buffer
        self.num_roles = max(1, where.workers)
        self.bad = self.warned = 0

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        first_chunk = self.start_step // self.chunk
        role = (worker + first_chunk) % self.num_roles
        rank = self.where.rank
        shards = stream_shards(list(self.shard_set.shards), self.where.world * self.num_roles,
                               rank * self.num_roles + role)
        rng = np.random.default_rng([self.seed, rank, role])
        try:
            pool = ShufflePool(self._blocks(shards, rng), max(self.shuffle_buffer, self.batch_size), rng)
            skip = max(0, -(-(first_chunk - role) // self.num_roles))  # ceil((first - role) / roles)
            for _ in range(skip * self.chunk):
                pool.draw(self.batch_size, keep=False)
            if self.start_step:
                self.bad = 0              # what filling the pool and skipping met, the first run counted
            while True:
                draws = [pool.draw(self.batch_size) for _ in range(self.chunk)]
                # NHWC storage seen as NCHW: the channels_last layout the models run in, with no copy.
                images = torch.from_numpy(draws[0] if self.chunk == 1 else np.concatenate(draws)).permute(0, 3, 1, 2)
                bad, self.bad = self.bad, 0
                yield images, bad
        except NoSamples as exc:
            yield Stopped(str(exc))

    def _problem(self, what: str) -> None:
        self.bad += 1
        self.warned += 1
        if self.warned <= self.MAX_WARNINGS:
            more = " (further warnings from this stream suppressed)" if self.warned == self.MAX_WARNINGS else ""
            warn(f"{what}{more}", mine=True)

    def _blocks(self, shards: list[Shard], rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Infinite uint8 image blocks (n, R, R, 3); the shard order is reshuffled every pass."""
        on_error = lambda where, exc: self._problem(f"skipping unreadable data in shard {where}: {exc}")
        while True:
            read = 0
            order = [shards[i] for i in rng.permutation(len(shards))]
            for sample in read_shards(self.shard_set, order, on_error):
                block = self._block(sample)
                if block is not None and len(block):
                    read += len(block)
                    yield block
            if read == 0:                 # a whole pass gave nothing: never spin forever on bad shards
                raise NoSamples(f"no readable samples in shards {', '.join(s.shown for s in shards)}")

    def _block(self, sample: dict) -> Optional[np.ndarray]:
        if "npy" not in sample:           # a lone .json: a block whose images are missing
            self._problem(f"skipping block {sample['__key__']} in shard {sample['__url__']}: it has no .npy member")
            return None
        try:
            return decode_block(sample["npy"], self.shard_set.resolution)
        except ShardError as exc:
            self._problem(f"skipping unreadable block {sample['__key__']}.npy in shard {sample['__url__']}: {exc}")
            return None


CHUNK_IMAGES = 512                     # images per worker hand-over: 4 batches of 128, 6 MB at 64 px


class Batches:
    """Iterating a loader: (images, bad) one batch at a time. Each chunk a worker hands over is split into
    batches (views: a pinned chunk gives pinned batches), and the first `drop` are dropped, which a resume
    in mid-chunk has trained on already."""

    def __init__(self, loader: DataLoader, batch_size: int, drop: int):
        self.chunks, self.batch_size, self.drop = iter(loader), batch_size, drop
        self.pending: list[tuple[torch.Tensor, int]] = []

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> tuple[torch.Tensor, int]:
        while not self.pending:
            item = next(self.chunks)
            if isinstance(item, Stopped):
                raise RunStopped(item.reason)
            images, bad = item
            parts = images.split(self.batch_size)
            self.pending = [(part, bad if i == 0 else 0) for i, part in enumerate(parts)][self.drop:]
            self.drop = 0
        return self.pending.pop(0)

    def close(self) -> None:
        """Stop the worker processes now, even while an exception still references this iterator; left to
        garbage collection, interpreter exit can wait forever on a worker nobody has told to stop."""
        shutdown = getattr(self.chunks, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        # A worker still alive here is stuck (say, flushing batches into a queue nobody reads after a peer
        # died). DataLoader's fallback is SIGTERM, which our workers ignore (see _ignore_stop_signals), and
        # interpreter exit would then wait on it forever: kill it.
        for worker in getattr(self.chunks, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)


def batches(shard_set: ShardSet, cfg: Config, where: Placement, start_step: int = 0) -> Batches:
    """This rank's infinite stream of (images, bad), starting at step `start_step`."""
    chunk = max(1, CHUNK_IMAGES // cfg.data.batch_size) if where.workers else 1
    # Its own generator: creating the iterator draws a base seed, which must not come from (and shift)
    # the global torch RNG that the training noise uses, or a resumed run would draw different noise.
    loader = DataLoader(BatchStream(shard_set, cfg, where, start_step, chunk), batch_size=None,
                        num_workers=where.workers, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=max(2, 4 // chunk) if where.workers else None, persistent_workers=False,
                        generator=torch.Generator().manual_seed(cfg.seed + 1000 * where.rank),
                        worker_init_fn=_ignore_stop_signals)
    return Batches(loader, cfg.data.batch_size, start_step % chunk)


def _ignore_stop_signals(_worker_id: int) -> None:
    # SIGTERM/SIGINT sent to the whole process group (Ctrl-C, scancel, kill -- -PGID) must reach the
    # training process, which stops at a step boundary with a checkpoint; a worker dying first would
    # crash it instead. The training process shuts the workers down itself.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ordered_blocks(shard_set: ShardSet) -> Iterator[tuple[np.ndarray, dict]]:
    """Every image block of the set in shard order, with its tar sample (its .json records), for readers
    that need the same images every time: evaluation and the attribute classifier. What cannot be
    read is skipped with a warning."""
    def skip(where: str, exc: Exception) -> None:
        warn(f"skipping unreadable data in shard {where}: {exc}")

    for sample in read_shards(shard_set, list(shard_set.shards), skip, verify_local=True):
        try:
            yield decode_block(sample["npy"], shard_set.resolution), sample
        except (KeyError, ShardError) as exc:
            skip(sample["__url__"], exc)


def image_batches(shard_set: ShardSet, count: int, batch: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(j, uint8 (n, 3, R, R) images j*batch .. (j+1)*batch) over the set's first `count` readable
    images in shard order: the same batches every time, for readers that split them over ranks."""
    r = shard_set.resolution
    pending, have, j = np.empty((0, r, r, 3), np.uint8), 0, 0
    for block, _ in ordered_blocks(shard_set) if count > 0 else ():
        block = block[: count - have]
        have += len(block)
        pending = np.concatenate([pending, block])
        while len(pending) >= batch or (have == count and len(pending)):
            yield j, torch.from_numpy(pending[:batch]).permute(0, 3, 1, 2).contiguous()
            pending, j = pending[batch:], j + 1
        if have == count:
            return
    if len(pending):
        yield j, torch.from_numpy(pending).permute(0, 3, 1, 2).contiguous()
