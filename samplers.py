"""Samplers: repeated augmentation for training (DeiT's ``RASampler``) and an exact sharded sampler for evaluation.

Repeated augmentation (Hoffer et al., 2020; Berman et al., 2019) shows each image ``num_repeats`` times per epoch,
spread over the ranks, so that every rank sees different augmentations of the same images; the epoch is then cut
back to about one pass over the data, as DeiT does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Sampler

import utils


def _resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fills in world size and rank from ``torch.distributed`` (1 and 0 without a process group) and checks them."""
    num_replicas = utils.get_world_size() if num_replicas is None else int(num_replicas)
    rank = utils.get_rank() if rank is None else int(rank)
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
    return num_replicas, rank


class RASampler(RepeatAugSampler):
    """DeiT's ``RASampler``: timm's ``RepeatAugSampler`` (DeiT's code) with a base seed and checked arguments.

    Each epoch: shuffle with a generator seeded by ``seed + epoch`` (identical on all ranks), repeat every index
    ``num_repeats`` times consecutively, pad to a multiple of ``num_replicas`` by cycling, give rank ``r`` every
    ``num_replicas``-th index from ``r`` (so the copies of one image land on different ranks), and keep the first
    ``len(self)`` of them: DeiT's ``len // 256 * 256 // num_replicas`` (one pass rounded down to a multiple of 256),
    or ``ceil(len / num_replicas)`` for datasets under 256 images, where DeiT's rule would give none.

    Args:
        dataset: Anything with ``len``.
        num_replicas: World size; defaults to the process group's.
        rank: This rank; defaults to the process group's.
        shuffle: Shuffle per epoch (otherwise dataset order).
        num_repeats: Copies of each image per epoch (3 in DeiT).
        seed: Base seed of the shuffle.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        num_repeats: int = 3,
        seed: int = 0,
    ) -> None:
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        num_replicas, rank = _resolve_replicas(num_replicas, rank)
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, num_repeats=num_repeats)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the next shuffle (call it before each epoch, on every rank).

        timm seeds the shuffle with ``self.epoch``, which is here ``seed + epoch``.
        """
        super().set_epoch(self.seed + int(epoch))


class ShardedEvalSampler(Sampler[int]):
    """Deterministic evaluation sampler that gives each index to exactly one rank (no padding, no duplicates).

    ``DistributedSampler`` pads the last shard with repeated images, which biases distributed evaluation; here rank
    ``r`` gets indices ``r, r + W, r + 2W, ...``, so metrics summed over ranks count every image once.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.dataset = dataset
        self.num_replicas, self.rank = _resolve_replicas(num_replicas, rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))
