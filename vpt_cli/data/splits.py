"""The splits object every reader returns, and the splitting done after reading: the stratified
auto-split and K-shot subsets."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sample:
    """One image file and its class index."""

    path: Path
    label: int


@dataclass
class DatasetSplits:
    """What a reader found (vpt_cli.data.readers): classes, train/val samples, and what it left out."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    source: str
    skipped: list[tuple[Path, str]]


def stratified_split(
    samples: list[Sample], val_split: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out round(n * val_split) images per class, deterministically for a seed.

    Each class is shuffled with its own RNG seeded by (seed, label), so adding a class does not
    reshuffle the others. A class with >= 2 images keeps >= 1 train and gets >= 1 val image.
    """
    train: list[Sample] = []
    val: list[Sample] = []
    for label, group in _by_label(samples):
        n = len(group)
        n_val = min(max(round(n * val_split), 1), n - 1) if val_split > 0 and n >= 2 else 0
        order = list(range(n))
        random.Random(f"{seed}/{label}").shuffle(order)
        held = set(order[:n_val])
        train += [s for i, s in enumerate(group) if i not in held]
        val += [s for i, s in enumerate(group) if i in held]
    return train, val


def auto_source(val_split: float, seed: int) -> str:
    return f"auto-split ({val_split * 100:.4g}% val, seed {seed})"


def few_shot(samples: list[Sample], shots: int, seed: int) -> list[Sample]:
    """K images per class (all of a class with fewer), drawn with a per-class RNG for (seed, label)
    as VTAB-1k-style few-shot runs are; the kept files stay in their original order."""
    kept: set[int] = set()
    for label, group in _by_label(list(enumerate(samples)), key=lambda item: item[1].label):
        order = [index for index, _ in group]
        random.Random(f"shots/{seed}/{label}").shuffle(order)
        kept.update(order[:shots])
    return [sample for index, sample in enumerate(samples) if index in kept]


def class_counts(samples: list[Sample], num_classes: int) -> list[int]:
    """Images per class index."""
    counts = [0] * num_classes
    for sample in samples:
        counts[sample.label] += 1
    return counts


def _by_label(items: list, key=lambda sample: sample.label) -> list[tuple[int, list]]:
    """Items grouped by class label, labels ascending, items in their original order."""
    groups: dict[int, list] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return sorted(groups.items())
