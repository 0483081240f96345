"""What a task type decides, as one object: the loss, how logits become scores and answers, what
the linear probe and model selection maximise. The epoch loop, the probe, evaluation, predict and
the server only call it; the task file names it (`objective`), so a task answers as it was trained.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

from vpt_cli.core.errors import TaskError

if TYPE_CHECKING:
    from torch import Tensor

    from vpt_cli.evaluation.metrics import EvalReport
    from vpt_cli.evaluation.multilabel import MultiLabelReport

    Report = EvalReport | MultiLabelReport

# (class name, score), best first: one task's answer for one image.
Answer = list[tuple[str, float]]


class Objective:
    """The interface every task type implements; `name` is what task files store, `multi_label`
    whether an image may be of several classes (its targets are then multi-hot rows), and
    `score_columns` the names results.csv gives a val report's `score` and `second_score`."""

    name: ClassVar[str]
    multi_label: ClassVar[bool] = False
    score_columns: ClassVar[tuple[str, str]] = ("val_acc", "val_balanced_acc")
    score_name: ClassVar[str] = "acc"  # what the probe's val score is, in the run log

    @classmethod
    def from_task(cls, thresholds: list[float] | None) -> "Objective":
        """The objective a task file's fields describe, for inference (training-only settings left out)."""
        return cls()

    @property
    def refits_head_by_default(self) -> bool:
        """Whether `--refit-head auto` fits the head once more on the final features: where the
        trained head is biased towards the training class frequencies (a long-tailed single-label
        run); no for a task type without such a bias to undo."""
        return False

    def task_thresholds(self) -> list[float] | None:
        """What the task file stores as `thresholds` (None: this task type has none)."""
        return None

    def loss(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """The training loss of a batch: its mean, or with `reduction` "sum" the numerator of
        that mean, whose denominator is `batch_weight` (so data-parallel processes can share it)."""
        raise NotImplementedError

    def batch_weight(self, targets: Tensor) -> float:
        """What a batch's mean training loss divides by."""
        raise NotImplementedError

    def probe_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The loss the linear probe fits (it sees every image once)."""
        raise NotImplementedError

    def eval_loss_sum(self, logits: Tensor, targets: Tensor) -> float:
        """The plain (unweighted) loss summed over a batch: the val loss of results.csv."""
        raise NotImplementedError

    def correct(self, logits: Tensor, targets: Tensor) -> int:
        """How many of a batch's images are answered right (the train accuracy's numerator)."""
        raise NotImplementedError

    def probe_score(self, logits: Tensor, targets: Tensor) -> float:
        """What the probe's L2 strength is picked by on val (higher is better)."""
        raise NotImplementedError

    def selection_key(self, report: "Report") -> tuple[float, float]:
        """What best-epoch selection maximises, from a val report."""
        raise NotImplementedError

    def accumulator(self, num_classes: int) -> Any:
        """A fresh streaming metric accumulator (update / sum_across / report) for this task type."""
        raise NotImplementedError

    def report(self, logits: Tensor, targets: Tensor, classes: list[str], loss: float | None = None) -> "Report":
        """The metrics of logits held in memory (what the accumulator gives after one update)."""
        accumulator = self.accumulator(len(classes))
        accumulator.update(logits, targets)
        report = accumulator.report(classes)
        report.loss = loss
        return report

    @property
    def tunes_on_val(self) -> bool:
        """Whether `tuned` learns anything from val logits after training."""
        return False

    def tuned(self, logits: Tensor, targets: Tensor) -> "Objective":
        """This objective with what it tunes after training (multi-label thresholds) fitted to val logits."""
        return self

    def scores(self, logits: Tensor) -> Tensor:
        """Per-class scores in [0, 1] of a (B, C) batch of logits."""
        raise NotImplementedError

    def answer(self, logits: Tensor, classes: list[str], k: int | None) -> Answer:
        """One image's answer from its (C,) logits over its task's `classes`: the `k` best classes,
        or with `k` None the task type's own answer (top 3; multi-label: every class over its threshold)."""
        raise NotImplementedError


SINGLE_LABEL = "single-label"  # every task file from before objectives were stored is one
MULTI_LABEL = "multi-label"

# Task type name -> (module, class, multi_label): a registry that needs no torch to list or check
# names, or to know whether a task file must hold thresholds (the task-file validation and `vpt
# tasks` use it); the class is imported when a task needs it.
_OBJECTIVES: dict[str, tuple[str, str, bool]] = {
    SINGLE_LABEL: ("vpt_cli.objectives.single_label", "SingleLabel", False),
    MULTI_LABEL: ("vpt_cli.objectives.multi_label", "MultiLabel", True),
}


def objective_names() -> tuple[str, ...]:
    return tuple(_OBJECTIVES)


def is_multi_label(name: str) -> bool:
    """Whether the task type `name` (a registered one) gives an image several labels, without importing it."""
    return _OBJECTIVES[name][2]


def objective_class(name: str) -> type[Objective]:
    """The task type a task file names; an unknown one is refused like any other bad field."""
    if not isinstance(name, str) or name not in _OBJECTIVES:
        raise TaskError(f"objective must be one of {', '.join(_OBJECTIVES)}, not {str(name)[:40]!r}")
    module, cls, multi_label = _OBJECTIVES[name]
    kind = getattr(importlib.import_module(module), cls)
    assert kind.name == name and kind.multi_label == multi_label, f"{module}.{cls} is registered as {name} but calls itself {kind.name}"
    return kind
