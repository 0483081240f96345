"""What a task type decides, as one object: the loss, how logits become scores and answers, what
the linear probe and model selection maximise. The epoch loop, the probe, evaluation, predict and
the server only call it; the task file names it (`objective`), so a task answers as it was trained.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, ClassVar

from vpt_cli.core.errors import TaskError

if TYPE_CHECKING:
    from torch import Tensor

    from vpt_cli.evaluation.metrics import EvalReport

# (class name, score), best first: one task's answer for one image.
Answer = list[tuple[str, float]]


class Objective:
    """The interface every task type implements; `name` is what task files store."""

    name: ClassVar[str]

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

    def selection_key(self, report: "EvalReport") -> tuple[float, float]:
        """What best-epoch selection maximises, from a val report."""
        raise NotImplementedError

    def scores(self, logits: Tensor) -> Tensor:
        """Per-class scores in [0, 1] of a (B, C) batch of logits."""
        raise NotImplementedError

    def answer(self, logits: Tensor, classes: list[str], k: int) -> Answer:
        """One image's answer from its (C,) logits over its task's `classes`."""
        raise NotImplementedError


SINGLE_LABEL = "single-label"  # every task file from before objectives were stored is one

# Task type name -> (module, class): a registry that needs no torch to list or check names (the
# task-file validation and `vpt tasks` use it); the class is imported when a task needs it.
_OBJECTIVES: dict[str, tuple[str, str]] = {
    SINGLE_LABEL: ("vpt_cli.objectives.single_label", "SingleLabel"),
}


def objective_names() -> tuple[str, ...]:
    return tuple(_OBJECTIVES)


def objective_class(name: str) -> type[Objective]:
    """The task type a task file names; an unknown one is refused like any other bad field."""
    if not isinstance(name, str) or name not in _OBJECTIVES:
        raise TaskError(f"objective must be one of {', '.join(_OBJECTIVES)}, not {str(name)[:40]!r}")
    module, cls = _OBJECTIVES[name]
    kind = getattr(importlib.import_module(module), cls)
    assert kind.name == name, f"{module}.{cls} is registered as {name} but calls itself {kind.name}"
    return kind
