"""Torch plumbing: a dataset that skips undecodable images, its collate, and seeded loaders."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from vpt_cli.data.images import ImageLoadError, failure_reason, load_image
from vpt_cli.data.splits import Sample
from vpt_cli.runtime.sharding import ShardedBatchSampler

_AUTO_WORKERS_MIN_ITEMS = 64


class ImageDataset(Dataset):
    """Samples -> (tensor, label, index); an undecodable image yields None instead of crashing.

    Failures are flagged in a shared-memory tensor, so those hit inside DataLoader worker
    processes are visible in the main process through `failures`.
    """

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], torch.Tensor],
                 decode: Callable[[Path], Image.Image] = load_image) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.decode = decode  # e.g. a DecodeCache's load: decoded and shrunk once per run
        self._failed = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        sample = self.samples[index]
        try:
            image = self.decode(sample.path)
        except ImageLoadError:
            self._failed[index] = True
            return None
        return self.transform(image), sample.label, index

    @property
    def failures(self) -> list[tuple[Path, str]]:
        """(path, reason) of every image that failed to load so far, in any process."""
        failed = [self.samples[i].path for i in self._failed.nonzero().flatten().tolist()]
        return [(path, failure_reason(path)) for path in failed]


def collate_skip_bad(
    batch: list[tuple[torch.Tensor, int, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Stack a batch without its failed items -> (images, labels, indices), or None if all failed."""
    good = [item for item in batch if item is not None]
    if not good:
        return None
    images, labels, indices = zip(*good)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices)


def auto_workers(num_items: int) -> int:
    """Loader processes: none for tiny datasets (start-up costs more than it saves)."""
    if num_items < _AUTO_WORKERS_MIN_ITEMS:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, workers: int | None, seed: int, drop_last: bool = False,
    class_balanced: bool = False, shard: tuple[int, int] = (0, 1),
) -> DataLoader:
    """A DataLoader that skips bad images and shuffles reproducibly for `seed` (its `generator`).

    `class_balanced` (an ImageDataset's samples) draws classes equally often instead of shuffling.
    `batch_size` is the global batch; with `shard` = (rank, world) this process loads only its
    slice of each one (vpt_cli.runtime.sharding), drawn from the same order as a single process."""
    workers = auto_workers(len(dataset)) if workers is None else workers
    generator = torch.Generator()
    generator.manual_seed(seed)
    if class_balanced:
        order: Sampler = class_balanced_sampler([s.label for s in dataset.samples], generator)
    else:
        order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_sampler=ShardedBatchSampler(BatchSampler(order, batch_size, drop_last), *shard),
        num_workers=workers,
        collate_fn=collate_skip_bad,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


def class_balanced_sampler(labels: list[int], generator: torch.Generator) -> WeightedRandomSampler:
    """Draws len(labels) indices with replacement, each class equally likely (the loader's
    generator, so a resumed run draws what the uninterrupted one would)."""
    counts: dict[int, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)
