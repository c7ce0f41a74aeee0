"""RASampler (repeated augmentation) and the exact sharded evaluation sampler."""

from __future__ import annotations

from collections import Counter

import pytest

from samplers import RASampler, ShardedEvalSampler


def _epoch(n: int, world: int, epoch: int = 0, **kwargs) -> list[list[int]]:
    shards = []
    for rank in range(world):
        s = RASampler(range(n), num_replicas=world, rank=rank, **kwargs)
        s.set_epoch(epoch)
        shards.append(list(s))
    return shards


@pytest.mark.parametrize("n", [1, 2, 5, 17, 100, 255])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_small_datasets_never_yield_zero_samples(n, world):
    shards = _epoch(n, world)
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1, "every rank must take the same number of steps (DDP)"
    length = lengths.pop()
    assert length == len(RASampler(range(n), num_replicas=world, rank=0)) > 0
    assert all(0 <= i < n for s in shards for i in s)


@pytest.mark.parametrize("n,world", [(256, 1), (1000, 2), (1281, 8), (600, 3)])
def test_large_datasets_keep_deit_epoch_length(n, world):
    """DeiT's epoch: one pass floored to a multiple of 256, split over ranks."""
    expected = n // 256 * 256 // world
    assert len(RASampler(range(n), num_replicas=world, rank=0)) == expected
    assert all(len(s) == expected for s in _epoch(n, world))


def test_each_image_repeated_three_times_across_ranks():
    n, world = 12, 3
    full = [
        RASampler(range(n), num_replicas=world, rank=r, seed=5) for r in range(world)
    ]  # take whole shards (before the cut) through num_selected = num_samples
    for s in full:
        s.num_selected_samples = s.num_samples
    counts = Counter(i for s in full for i in s)
    assert counts == {i: 3 for i in range(n)}
    # the three copies of an image are consecutive in the repeated list, so they land on different ranks
    shard_of = {r: set(s) for r, s in enumerate(full)}
    assert all(sum(i in shard_of[r] for r in range(world)) == 3 for i in range(n))


def test_epoch_seeded_shuffle():
    a = _epoch(40, 2, epoch=0, seed=1)
    b = _epoch(40, 2, epoch=0, seed=1)
    c = _epoch(40, 2, epoch=1, seed=1)
    assert a == b
    assert a != c
    no_shuffle = _epoch(6, 1, shuffle=False)[0]
    assert no_shuffle == [0, 0, 0, 1, 1, 1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        RASampler(range(4), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_repeats"):
        RASampler(range(4), num_replicas=1, rank=0, num_repeats=0)


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (9, 1)])
def test_sharded_eval_sampler_counts_each_image_once(n, world):
    shards = [list(ShardedEvalSampler(range(n), world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardedEvalSampler(range(n), world, r)) for r in range(world)] == [len(s) for s in shards]
