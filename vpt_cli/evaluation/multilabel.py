"""Multi-label metrics: every class scored on its own (sigmoid), answered by its own threshold.

Definitions follow scikit-learn (average_precision_score, f1_score with zero_division=0) so the
numbers compare with papers and notebooks: AP is the step-wise area under a class's
precision-recall curve over its distinct scores, mAP its mean over the classes that have a
positive; F1, precision and recall are at the task's thresholds (an image is a positive of a
class when its score is at least that class's threshold). Plain Python out, ready for JSON.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from vpt_cli.runtime import distributed

FALLBACK_THRESHOLD = 0.5  # a class without a val positive has no F1 to tune


@dataclass
class LabelMetrics:
    """One class's row of a multi-label report."""

    name: str
    ap: float | None  # None: no positive image, so no precision-recall curve
    precision: float
    recall: float
    f1: float
    support: int  # positive images of this class
    threshold: float


@dataclass
class MultiLabelReport:
    """Everything an evaluation of a multi-label task says, ready for JSON, tables and plots."""

    score_name: ClassVar[str] = "mAP"

    num_samples: int
    mean_ap: float  # macro over the classes with a positive
    micro_precision: float
    micro_recall: float
    micro_f1: float
    macro_precision: float  # macro: over the classes that occur in the labels or the predictions
    macro_recall: float
    macro_f1: float
    exact_match: float  # images whose every class is answered right
    hamming_loss: float  # wrong (image, class) answers / all of them
    loss: float | None  # mean binary cross-entropy summed over classes
    per_class: list[LabelMetrics]
    classes: list[str]

    @property
    def score(self) -> float:
        """What selection and the probe maximise: mAP (threshold-free)."""
        return self.mean_ap

    @property
    def second_score(self) -> float:
        return self.macro_f1

    def summary(self, split: str) -> dict[str, Any]:
        """The numbers a task file keeps of this split."""
        return {f"{split}_map": self.mean_ap, f"{split}_macro_f1": self.macro_f1, f"{split}_micro_f1": self.micro_f1,
                f"{split}_exact_match": self.exact_match, f"{split}_samples": self.num_samples}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ranked_counts(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One class's distinct scores, highest first, with the true positives and the images answered
    positive when everything at or above each one is: the points of its precision-recall curve."""
    order = scores.double().argsort(descending=True, stable=True)
    ranked, hits = scores.double()[order], targets.double()[order]
    last_of_value = torch.ones_like(ranked, dtype=torch.bool)
    last_of_value[:-1] = ranked[1:] != ranked[:-1]
    predicted = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
    return ranked[last_of_value], hits.cumsum(0)[last_of_value], predicted[last_of_value]


def average_precision(scores: Tensor, targets: Tensor) -> float | None:
    """AP of one class: sum over its distinct scores, highest first, of (recall gained) x precision
    there; tied scores enter together. None when the class has no positive."""
    positives = float(targets.double().sum())
    if positives == 0:
        return None
    _, tp, predicted = _ranked_counts(scores, targets)
    recall_gain = torch.diff(tp, prepend=torch.zeros(1, dtype=torch.float64)) / positives
    return float((recall_gain * tp / predicted).sum())


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """mAP of (N, C) scores against multi-hot targets: the mean AP over classes with a positive (0.0 if none)."""
    values = [ap for c in range(scores.shape[1]) if (ap := average_precision(scores[:, c], targets[:, c])) is not None]
    return sum(values) / len(values) if values else 0.0


def tune_thresholds(scores: Tensor, targets: Tensor) -> list[float]:
    """Per class, the threshold that maximises that class's F1 on these (val) scores: halfway
    between the lowest score answered positive and the next lower score (so the same answers
    come out, with a margin either way); ties keep the higher threshold. A class without a
    positive gets FALLBACK_THRESHOLD."""
    thresholds = []
    for c in range(scores.shape[1]):
        positives = float(targets[:, c].double().sum())
        if positives == 0:
            thresholds.append(FALLBACK_THRESHOLD)
            continue
        values, tp, predicted = _ranked_counts(scores[:, c], targets[:, c])
        best = int((2 * tp / (predicted + positives)).argmax())  # the first maximum: the highest threshold
        lower = values[best + 1] if best + 1 < len(values) else values[best]
        thresholds.append(float((values[best] + lower) / 2))
    return thresholds


def multilabel_report(scores: Tensor, targets: Tensor, thresholds: list[float], classes: list[str],
                      loss: float | None = None) -> MultiLabelReport:
    """Every metric of (N, C) sigmoid `scores` against multi-hot `targets` at `thresholds`."""
    if scores.shape != targets.shape or scores.dim() != 2 or scores.shape[1] != len(classes):
        raise ValueError(f"scores and targets must both be [N, {len(classes)}], got {tuple(scores.shape)} "
                         f"and {tuple(targets.shape)}")
    if len(thresholds) != len(classes):
        raise ValueError(f"{len(thresholds)} thresholds for {len(classes)} classes")
    n = scores.shape[0]
    truth = targets.bool()
    answered = scores >= torch.tensor(thresholds, dtype=scores.dtype)
    tp = (answered & truth).sum(0).double()
    predicted, support = answered.sum(0).double(), truth.sum(0).double()

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    precision, recall, f1 = ratio(tp, predicted), ratio(tp, support), ratio(2 * tp, support + predicted)
    occurring = (support > 0) | (predicted > 0)

    def macro(values: Tensor) -> float:
        return float(values[occurring].mean()) if occurring.any() else 0.0

    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(len(classes))]
    present = [ap for ap in aps if ap is not None]
    micro_tp, micro_predicted, micro_support = float(tp.sum()), float(predicted.sum()), float(support.sum())
    return MultiLabelReport(
        num_samples=n,
        mean_ap=sum(present) / len(present) if present else 0.0,
        micro_precision=micro_tp / micro_predicted if micro_predicted else 0.0,
        micro_recall=micro_tp / micro_support if micro_support else 0.0,
        micro_f1=2 * micro_tp / (micro_predicted + micro_support) if micro_predicted + micro_support else 0.0,
        macro_precision=macro(precision), macro_recall=macro(recall), macro_f1=macro(f1),
        exact_match=float((answered == truth).all(1).double().mean()) if n else 0.0,
        hamming_loss=float((answered != truth).double().mean()) if n else 0.0,
        loss=loss,
        per_class=[LabelMetrics(name, ap, float(p), float(r), float(f), int(s), float(t))
                   for name, ap, p, r, f, s, t in zip(classes, aps, precision, recall, f1, support, thresholds)],
        classes=list(classes),
    )


class MultiLabelAccumulator:
    """Keeps every image's scores and targets (AP needs them all; N x C floats), then reports at
    `thresholds`; the same update/sum_across/report calls as the single-label MetricAccumulator."""

    def __init__(self, thresholds: list[float]) -> None:
        self.thresholds = thresholds
        self._scores: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._loss_sum = 0.0
        self._loss_samples = 0

    def update(self, logits: Tensor, targets: Tensor, loss_sum: float | None = None) -> None:
        """Add one batch of (B, C) logits and multi-hot targets (`loss_sum`: the batch's summed loss)."""
        self._scores.append(logits.detach().float().sigmoid().cpu())
        self._targets.append(targets.detach().cpu().to(torch.uint8))
        if loss_sum is not None:
            self._loss_sum += float(loss_sum)
            self._loss_samples += len(targets)

    def sum_across(self, reduce: Callable[[Tensor], Tensor]) -> None:
        """Every process's rows (gathered: AP cannot be summed), the loss summed by `reduce`."""
        self._scores = [torch.cat(distributed.gather_lists(self._scores) or [torch.empty(0, len(self.thresholds))])]
        self._targets = [torch.cat(distributed.gather_lists(self._targets) or [torch.empty(0, len(self.thresholds))])]
        loss = reduce(torch.tensor([self._loss_sum, self._loss_samples], dtype=torch.float64))
        self._loss_sum, self._loss_samples = float(loss[0]), int(loss[1])

    def report(self, classes: list[str]) -> MultiLabelReport:
        """Metrics so far; the loss is the per-image mean, or None unless every image had one."""
        width = len(classes)
        scores = torch.cat(self._scores) if self._scores else torch.empty(0, width)
        targets = torch.cat(self._targets) if self._targets else torch.empty(0, width, dtype=torch.uint8)
        loss = self._loss_sum / len(scores) if len(scores) and self._loss_samples == len(scores) else None
        return multilabel_report(scores, targets, self.thresholds, classes, loss)
