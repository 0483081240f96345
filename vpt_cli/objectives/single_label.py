"""One label per image: softmax cross-entropy under the run's class balance, argmax answers,
top-1 accuracy for selection (balanced accuracy for the probe when classes are balanced)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vpt_cli.evaluation.metrics import MetricAccumulator
from vpt_cli.objectives.balance import ClassBalance
from vpt_cli.objectives.base import SINGLE_LABEL, Answer, Objective

if TYPE_CHECKING:
    from vpt_cli.evaluation.metrics import EvalReport

DEFAULT_TOP_K = 3  # classes answered when no k is asked for


@dataclass(frozen=True)
class SingleLabel(Objective):
    """Today's (and every older task file's) task type."""

    name: ClassVar[str] = SINGLE_LABEL
    balance: ClassBalance = field(default_factory=ClassBalance)

    @property
    def refits_head_by_default(self) -> bool:
        return self.balance.long_tailed

    def loss(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        return self.balance.loss(logits, targets, reduction=reduction)

    def batch_weight(self, targets: Tensor) -> float:
        return self.balance.batch_weight(targets)

    def probe_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.balance.probe_loss(logits, targets)

    def eval_loss_sum(self, logits: Tensor, targets: Tensor) -> float:
        return F.cross_entropy(logits, targets, reduction="sum").item()

    def correct(self, logits: Tensor, targets: Tensor) -> int:
        return int((logits.argmax(1) == targets).sum().item())

    def probe_score(self, logits: Tensor, targets: Tensor) -> float:
        """Accuracy, or under a class balance the mean per-class recall over the classes present
        (what balancing is for)."""
        hits = (logits.argmax(1) == targets).float()
        if self.balance.mode == "none":
            return hits.mean().item()
        return torch.stack([hits[targets == c].mean() for c in targets.unique()]).mean().item()

    def selection_key(self, report: "EvalReport") -> tuple[float, float]:
        """Val top-1, ties to the lower val loss."""
        return report.top1, -(report.loss or 0.0)

    def accumulator(self, num_classes: int) -> MetricAccumulator:
        return MetricAccumulator(num_classes)

    def scores(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1)

    def answer(self, logits: Tensor, classes: list[str], k: int | None) -> Answer:
        """The `k` (DEFAULT_TOP_K) most probable classes (fewer when the task has fewer)."""
        probs = self.scores(logits[: len(classes)].float())
        values, index = probs.topk(min(DEFAULT_TOP_K if k is None else k, len(classes)))
        return [(classes[c], float(v)) for v, c in zip(values.tolist(), index.tolist())]
