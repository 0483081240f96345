"""The splits object every reader returns, and the splitting done after reading: the stratified
auto-split and K-shot subsets, for one label per image or several (multi-hot)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sample:
    """One image file and its class index, or for a multi-label task its multi-hot tuple (one 0/1
    per class), which the loader batches into a (B, C) target."""

    path: Path
    label: int | tuple[int, ...]

    @property
    def positives(self) -> list[int]:
        """The classes the image is an example of."""
        if isinstance(self.label, tuple):
            return [c for c, hot in enumerate(self.label) if hot]
        return [self.label]


@dataclass
class DatasetSplits:
    """What a reader found (vpt_cli.data.readers): classes, train/val samples, and what it left out."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    source: str
    skipped: list[tuple[Path, str]]
    multi_label: bool = False


def stratified_split(
    samples: list[Sample], val_split: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out round(n * val_split) images per class, deterministically for a seed.

    Each class is shuffled with its own RNG seeded by (seed, label), so adding a class does not
    reshuffle the others. A class with >= 2 images keeps >= 1 train and gets >= 1 val image.
    Multi-label images are stratified by their rarest class (images without one form a group).
    """
    train: list[Sample] = []
    val: list[Sample] = []
    for label, group in _by_label(samples, key=_rarest_class(samples)):
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
    as VTAB-1k-style few-shot runs are; the kept files stay in their original order.

    Multi-label: classes in index order each draw images until they have K positives, an image
    drawn for one class counting for all its labels (so frequent classes may end with more);
    images without labels are left out."""
    by_class: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        for positive in sample.positives:
            by_class.setdefault(positive, []).append(index)
    kept: set[int] = set()
    have: dict[int, int] = {}
    for label, order in sorted(by_class.items()):
        random.Random(f"shots/{seed}/{label}").shuffle(order)
        for index in order:
            if have.get(label, 0) >= shots:
                break
            if index not in kept:
                kept.add(index)
                for positive in samples[index].positives:
                    have[positive] = have.get(positive, 0) + 1
    return [sample for index, sample in enumerate(samples) if index in kept]


def class_counts(samples: list[Sample], num_classes: int) -> list[int]:
    """Images per class index (multi-label: the class's positive images)."""
    counts = [0] * num_classes
    for sample in samples:
        for positive in sample.positives:
            counts[positive] += 1
    return counts


def missing_positives(samples: list[Sample], classes: list[str]) -> list[str]:
    """Classes no sample is a positive of: a multi-label task cannot learn them."""
    return [name for name, count in zip(classes, class_counts(samples, len(classes))) if not count]


def _rarest_class(samples: list[Sample]):
    """The stratification key: the label, or a multi-label image's least frequent class (-1 for none)."""
    if not samples or not isinstance(samples[0].label, tuple):
        return lambda sample: sample.label
    counts = class_counts(samples, len(samples[0].label))
    return lambda sample: min(sample.positives, key=lambda c: (counts[c], c), default=-1)


def _by_label(items: list, key=lambda sample: sample.label) -> list[tuple[int, list]]:
    """Items grouped by class label, labels ascending, items in their original order."""
    groups: dict[int, list] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return sorted(groups.items())
