"""Progress and per-epoch records: the only way library code reports while it works.

Nothing below the CLI prints. The CLI renders a `Reporter` with rich; the library default
ignores everything, so `--json` and `--quiet` stay clean.
"""
from __future__ import annotations

from dataclasses import dataclass


class Reporter:
    """Progress sink. Subclass and override what you want to show; every method is optional."""

    def start(self, description: str, total: int | None) -> None:
        """A unit of work with `total` steps begins (an epoch, an evaluation pass)."""

    def advance(self, steps: int = 1) -> None:
        """`steps` more steps of the current unit are done."""

    def finish(self) -> None:
        """The current unit is done."""

    def epoch_end(self, stats: "EpochStats") -> None:
        """One training epoch finished (stats include validation)."""

    def log(self, message: str) -> None:
        """A line worth keeping in the run log (not shown with --quiet)."""


@dataclass
class EpochStats:
    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_acc: float | None
    val_loss: float | None
    lr: float
    images_per_sec: float
    seconds: float
    is_best: bool = False
    val_balanced_acc: float | None = None
