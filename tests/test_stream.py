"""The per-rank infinite stream: equal batches per rank, disjoint shards, exact restart at a step."""
import itertools
import shutil
import tarfile

import numpy as np
import pytest
import torch

from dcgan_dist.config import load_config
from dcgan_dist.data import stream
from dcgan_dist.data.shards import ShardSet, read_manifest
from dcgan_dist.data.stream import Placement, ShufflePool, ordered_blocks, stream_shards


def loader(shards, batch=16, seed=0, rank=0, world=1, workers=0, shuffle_buffer=64, start_step=0):
    cfg = load_config(None, [f"data.batch_size={batch}", f"seed={seed}", f"data.shuffle_buffer={shuffle_buffer}"])
    return stream.batches(ShardSet.open(shards), cfg, Placement(rank, world, workers), start_step)


def batches(shards32, rank, n, workers, start_step=0, seed=0, world=2, batch=16):
    got = list(itertools.islice(loader(shards32, batch, seed, rank, world, workers, start_step=start_step), n))
    assert all(bad == 0 for _, bad in got)
    return [images for images, _ in got]


def test_uneven_shards_give_equal_full_batches_per_rank(shards32):
    # 4 shards of 50, 50, 50, 43 over 2 ranks x 2 workers: one shard per stream, and the 43-image stream
    # must cycle as often as needed. 40 steps of 16 = 640 images per rank, over 3 passes of a shard.
    per_rank = [batches(shards32, rank, 40, workers=2) for rank in (0, 1)]
    for got in per_rank:
        assert len(got) == 40
        assert all(b.shape == (16, 3, 32, 32) and b.dtype == torch.uint8 for b in got)
    assert not torch.equal(per_rank[0][0], per_rank[1][0])


def test_streams_own_disjoint_shards():
    shards = [f"s{i}" for i in range(5)]
    owned = [stream_shards(shards, 4, i) for i in range(4)]
    assert owned == [["s0", "s4"], ["s1"], ["s2"], ["s3"]]
    assert stream_shards(shards[:2], 4, 3) == shards[:2]   # more streams than shards: resample all


@pytest.mark.parametrize("workers", [0, 2])
def test_restart_at_a_step_continues_the_same_stream(shards32, workers):
    full = batches(shards32, 1, 9, workers)
    for start in (1, 4, 7):
        resumed = batches(shards32, 1, 9 - start, workers, start_step=start)
        assert all(torch.equal(a, b) for a, b in zip(full[start:], resumed)), f"start_step={start}"


def test_restart_past_the_first_chunk_with_workers(shards32):
    # With workers, each hand-over is a chunk of 512 // 16 = 32 batches: restart in the middle of the
    # second and the third chunk, where the worker roles have rotated.
    full = batches(shards32, 0, 80, workers=2)
    for start in (33, 70):
        resumed = batches(shards32, 0, 80 - start, workers=2, start_step=start)
        assert all(torch.equal(a, b) for a, b in zip(full[start:], resumed)), f"start_step={start}"


def test_chunks_are_handed_over_as_pinned_views_of_one_chunk(shards32):
    it = loader(shards32, workers=1)
    first, second = next(it)[0], next(it)[0]
    assert first.shape == second.shape == (16, 3, 32, 32)
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()   # one hand-over
    assert first.is_contiguous(memory_format=torch.channels_last)


def test_seed_changes_the_order(shards32):
    a, b = batches(shards32, 0, 1, 0, seed=0)[0], batches(shards32, 0, 1, 0, seed=1)[0]
    assert not torch.equal(a, b)
    assert read_manifest(shards32)["count"] == 193


def _numbered_blocks(total, per_block):
    """Blocks whose images carry their own index in every pixel, cycling forever like a stream pass."""
    while True:
        for start in range(0, total, per_block):
            ids = np.arange(start, min(start + per_block, total))
            yield np.broadcast_to((ids % 256).astype(np.uint8)[:, None, None, None], (len(ids), 2, 2, 3)).copy()


def test_shuffle_pool_is_bounded_fair_and_mixes_blocks():
    pool = ShufflePool(_numbered_blocks(200, 25), capacity=64, rng=np.random.default_rng(0))
    drawn = np.concatenate([pool.draw(16)[:, 0, 0, 0] for _ in range(100)])   # 1600 images: 8 passes
    assert pool.pool.shape == (64, 2, 2, 3)                # memory is the capacity, not the dataset
    counts = np.bincount(drawn, minlength=200)
    assert counts.min() >= 3 and counts.max() <= 14, counts   # every image keeps coming back, none hogs
    first = drawn[:16]
    assert len(set(first // 25)) >= 2                      # a batch mixes blocks
    assert not np.array_equal(np.sort(first), first)       # and is not in storage order


def test_corrupt_block_is_skipped_and_counted(tmp_path, shards32):
    out = tmp_path / "shards"
    shutil.copytree(shards32, out)
    victim = out / "train-000000.tar"
    with tarfile.open(victim) as tar:
        member = tar.getmember("000017.npy")
    data = bytearray(victim.read_bytes())
    data[member.offset_data:member.offset_data + 8] = b"garbage!"      # breaks the .npy magic, tar stays valid
    victim.write_bytes(bytes(data))
    got = list(itertools.islice(loader(out, shuffle_buffer=32), 30))
    assert sum(bad for _, bad in got) >= 1
    assert all(images.shape == (16, 3, 32, 32) for images, _ in got)


def test_a_damaged_shard_is_left_out_of_the_ordered_images_with_one_warning(tmp_path, shards32, capsys):
    """What evaluation and the attribute classifier read: every block in shard order, a shard that fails
    its sha256 skipped with a warning naming it, the rest still read."""
    out = tmp_path / "shards"
    shutil.copytree(shards32, out)
    victim = out / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[-2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    shard_set = ShardSet.open(out)
    images = sum(len(block) for block, _ in ordered_blocks(shard_set))
    assert images == shard_set.manifest["count"] - shard_set.shards[1].count
    err = capsys.readouterr().err
    assert err.count("warning: skipping unreadable data in shard") == 1 and "train-000001.tar" in err, err


def test_batches_come_channels_last(shards32):
    images = batches(shards32, 0, 1, 0)[0]
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_problems_met_while_the_shuffle_pool_fills_are_counted(tmp_path, shards32):
    """A pool larger than the set reads every shard before the first batch: what it met there must
    reach the first batch's count (it was zeroed, so a set with a broken shard reported no errors)."""
    out = tmp_path / "shards"
    shutil.copytree(shards32, out)
    (out / "train-000001.tar").write_bytes(b"\0" * 10 + b"garbage" * 100)
    got = list(itertools.islice(loader(out, shuffle_buffer=2000), 3))
    assert got[0][1] >= 1
