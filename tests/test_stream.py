"""The per-rank infinite stream: equal batches per rank, disjoint shards, exact restart at a step."""
import itertools

import pytest
import torch

from dcgan_dist.data.shards import read_manifest, shard_paths
from dcgan_dist.data.stream import make_loader, stream_shards


def batches(shards32, rank, n, workers, start_step=0, seed=0, world=2, batch=16):
    loader = make_loader(shard_paths(shards32), batch, 32, seed, rank, world, workers, shuffle_buffer=64,
                         start_step=start_step)
    got = list(itertools.islice(iter(loader), n))
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


def test_seed_changes_the_order(shards32):
    a, b = batches(shards32, 0, 1, 0, seed=0)[0], batches(shards32, 0, 1, 0, seed=1)[0]
    assert not torch.equal(a, b)
    assert read_manifest(shards32)["count"] == 193
