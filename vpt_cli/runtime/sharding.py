"""Which samples each process loads when several share one run (data-parallel, torchrun).

Every process walks the same sequence of global batches (same sampler, same seeded generator)
and keeps its own contiguous slice of each, so the union of one step's slices is exactly the
single-process batch: nothing is padded or repeated, and metrics count every sample once.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from torch.utils.data import Sampler


def shard_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous share of `count` items; shares differ by at most one."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's slice of every batch `batches` yields (all of it when `world` is 1)."""

    def __init__(self, batches: Iterable[list[int]], rank: int = 0, world: int = 1):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            start, end = shard_bounds(len(batch), self.rank, self.world)
            yield batch[start:end]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]
