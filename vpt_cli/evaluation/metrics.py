"""Classification metrics for evaluation: torch tensors in, plain Python out.

Definitions follow scikit-learn with ``zero_division=0`` so numbers reported here can be compared
with papers and notebooks, but without making sklearn a dependency. Every public result is made
of builtin floats/ints/lists so it can go straight into JSON, the CLI's tables or a plot.
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from vpt_cli.core.fileio import atomic_write

TOP5_MIN_CLASSES = 5  # top-5 is reported only when there are at least five classes to rank


@dataclass
class ClassMetrics:
    """One class's row of the report."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int  # number of true samples of this class


@dataclass
class EvalReport:
    """Everything an evaluation says about a classifier, ready for JSON, tables and plots."""

    score_name: ClassVar[str] = "top-1"

    num_samples: int
    top1: float
    top5: float | None  # None when there are fewer than 5 classes
    balanced_accuracy: float  # mean recall over classes with support > 0
    macro_f1: float  # mean F1 over classes that occur in the labels or the predictions
    loss: float | None
    per_class: list[ClassMetrics]
    confusion: list[list[int]]  # [true][pred], classes x classes
    classes: list[str]
    # accuracy over classes with many (>100) / medium (20-100) / few (<20) training images, when known
    shot_groups: dict[str, float | None] | None = None

    @property
    def score(self) -> float:
        """What selection maximises and results.csv's val_acc holds (multi-label reports: mAP)."""
        return self.top1

    @property
    def second_score(self) -> float:
        """results.csv's second val column (multi-label reports: macro F1)."""
        return self.balanced_accuracy

    def summary(self, split: str) -> dict[str, Any]:
        """The numbers a task file keeps of this split."""
        return {f"{split}_top1": self.top1, f"{split}_top5": self.top5,
                f"{split}_balanced_accuracy": self.balanced_accuracy, f"{split}_macro_f1": self.macro_f1,
                f"{split}_samples": self.num_samples}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (nested dataclasses become dicts)."""
        return asdict(self)


def _check_inputs(logits: Tensor, labels: Tensor) -> None:
    """Reject shapes and labels that would silently produce wrong numbers."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be [N] with N={logits.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}")


def _topk_hits(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """Per-sample bool: is the true class among the k highest logits?

    Ties are broken towards the lower class index, exactly like ``argmax``, so top-1 always
    agrees with the confusion matrix diagonal and the result is deterministic (``torch.topk``
    leaves tie order unspecified).
    """
    labels = labels.long().to(logits.device)
    true_logit = logits.gather(1, labels[:, None])
    index = torch.arange(logits.shape[1], device=logits.device)
    ahead = (logits > true_logit) | ((logits == true_logit) & (index[None, :] < labels[:, None]))
    return ahead.sum(dim=1) < k


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Fraction of samples whose true class is among the top ``k`` logits (0.0 for no samples).

    ``k`` larger than the number of classes counts every sample as a hit, as sklearn does.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_inputs(logits, labels)
    if labels.numel() == 0:
        return 0.0
    return float(_topk_hits(logits.detach(), labels, k).float().mean())


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Counts as an int64 ``[num_classes, num_classes]`` tensor indexed ``[true, pred]``."""
    preds = preds.long().reshape(-1)
    labels = labels.long().reshape(-1).to(preds.device)
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels differ in length: {preds.numel()} vs {labels.numel()}")
    for name, values in (("preds", preds), ("labels", labels)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    flat = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _report_from_counts(
    confusion: Tensor, top5_hits: int | None, loss: float | None, classes: list[str]
) -> EvalReport:
    """Derive every metric from the confusion matrix; shared by one-shot and streaming paths."""
    confusion = confusion.cpu().long()
    n = int(confusion.sum())
    tp = confusion.diagonal().double()
    support = confusion.sum(dim=1).double()
    predicted = confusion.sum(dim=0).double()

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    precision = ratio(tp, predicted)
    recall = ratio(tp, support)
    # 2tp / (2tp + fp + fn) equals 2PR / (P + R) and stays defined when P or R is 0/0.
    f1 = ratio(2 * tp, support + predicted)
    present = support > 0
    occurring = present | (predicted > 0)

    return EvalReport(
        num_samples=n,
        top1=float(tp.sum() / n) if n else 0.0,
        top5=None if top5_hits is None else (top5_hits / n if n else 0.0),
        balanced_accuracy=float(recall[present].mean()) if present.any() else 0.0,
        macro_f1=float(f1[occurring].mean()) if occurring.any() else 0.0,
        loss=loss,
        per_class=[
            ClassMetrics(name, float(p), float(r), float(f), int(s))
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        ],
        confusion=confusion.tolist(),
        classes=list(classes),
    )


def classification_report(
    logits: Tensor, labels: Tensor, classes: list[str], loss: float | None = None
) -> EvalReport:
    """One-shot report over all logits; use MetricAccumulator when they do not fit in memory."""
    accumulator = MetricAccumulator(num_classes=len(classes))
    accumulator.update(logits, labels)
    report = accumulator.report(classes)
    report.loss = None if loss is None else float(loss)
    return report


class MetricAccumulator:
    """Streams batches into running counts so evaluation never holds all logits at once.

    ``num_classes`` is taken from the first batch when not given. Counts stay on the batches'
    device until ``report`` so a GPU evaluation loop is not synchronised on every batch.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self._confusion: Tensor | None = None
        self._top5_hits: Tensor | None = None
        self._loss_sum = 0.0
        self._loss_samples = 0

    @property
    def num_samples(self) -> int:
        """Samples seen so far."""
        return 0 if self._confusion is None else int(self._confusion.sum())

    def update(self, logits: Tensor, labels: Tensor, loss_sum: float | Tensor | None = None) -> None:
        """Add one batch. ``loss_sum`` is the summed (not mean) loss over the batch's samples."""
        _check_inputs(logits, labels)
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
        elif logits.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, logits have {logits.shape[1]}")
        logits = logits.detach()
        labels = labels.detach().long().to(logits.device)
        if self._confusion is None:
            self._confusion = torch.zeros(
                self.num_classes, self.num_classes, dtype=torch.long, device=logits.device
            )
            self._top5_hits = torch.zeros((), dtype=torch.long, device=logits.device)
        batch_confusion = confusion_matrix(logits.argmax(dim=1), labels, self.num_classes)
        self._confusion += batch_confusion.to(self._confusion.device)
        hits = _topk_hits(logits, labels, TOP5_MIN_CLASSES).sum()
        self._top5_hits += hits.to(self._top5_hits.device)
        if loss_sum is not None:
            self._loss_sum += float(loss_sum)
            self._loss_samples += labels.numel()

    def sum_across(self, reduce: Callable[[Tensor], Tensor]) -> None:
        """Replace the counts by their totals over processes (`reduce`: an all-reduce sum), so a
        data-parallel evaluation reports the whole set with every sample counted once."""
        if self._confusion is None:
            self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
            self._top5_hits = torch.zeros((), dtype=torch.long)
        self._confusion, self._top5_hits = reduce(self._confusion), reduce(self._top5_hits)
        loss = reduce(torch.tensor([self._loss_sum, self._loss_samples], dtype=torch.float64))
        self._loss_sum, self._loss_samples = loss[0].item(), int(loss[1].item())

    def report(self, classes: list[str]) -> EvalReport:
        """Metrics so far. Loss is the per-sample mean, or None unless every sample had a loss."""
        num_classes = len(classes) if self.num_classes is None else self.num_classes
        if len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for {num_classes} classes")
        if self._confusion is None:
            confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
            top5_hits = 0
        else:
            confusion = self._confusion
            top5_hits = int(self._top5_hits)
        n = int(confusion.sum())
        loss = self._loss_sum / n if n and self._loss_samples == n else None
        return _report_from_counts(
            confusion, top5_hits if num_classes >= TOP5_MIN_CLASSES else None, loss, classes
        )


def write_confusion_csv(report: EvalReport, path: Path) -> None:
    """Confusion matrix as CSV: header ``true\\pred,<classes>``, then one row per true class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true\\pred", *report.classes])
    for name, row in zip(report.classes, report.confusion):
        writer.writerow([name, *row])
    atomic_write(Path(path), lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8", newline=""))


@dataclass
class Calibration:
    """How far confidence is from accuracy: expected calibration error over equal-width bins."""

    ece: float  # sum over bins of (bin size / n) * |accuracy - mean confidence|
    bin_edges: list[float]
    bin_accuracy: list[float | None]  # None for an empty bin
    bin_confidence: list[float | None]
    bin_count: list[int]


def calibration(confidence: Tensor, correct: Tensor, bins: int = 15) -> Calibration:
    """ECE of top-1 `confidence` (max softmax probability) against `correct` (bool), the usual
    15 equal-width bins of (0, 1] (Guo et al. 2017)."""
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ValueError("confidence and correct must be 1-D tensors of the same length")
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence.double().clamp(1e-12, 1.0), edges[1:-1], right=True)
    total = max(len(confidence), 1)
    ece, accuracy, mean_conf, counts = 0.0, [], [], []
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        counts.append(count)
        if not count:
            accuracy.append(None)
            mean_conf.append(None)
            continue
        acc, conf = float(correct[members].double().mean()), float(confidence[members].double().mean())
        accuracy.append(acc)
        mean_conf.append(conf)
        ece += count / total * abs(acc - conf)
    return Calibration(ece, edges.tolist(), accuracy, mean_conf, counts)


SHOT_GROUPS = {"many": (101, None), "medium": (20, 100), "few": (0, 19)}  # training images per class, inclusive


def shot_group_accuracy(report: EvalReport, train_counts: list[int]) -> dict[str, float | None]:
    """Accuracy over the evaluated images of the classes in each training-count group (the
    long-tail convention of Liu et al. 2019); None for a group without evaluated images."""
    if len(train_counts) != len(report.classes):
        raise ValueError(f"{len(train_counts)} class counts for {len(report.classes)} classes")
    groups: dict[str, float | None] = {}
    for name, (low, high) in SHOT_GROUPS.items():
        members = [c for c, n in enumerate(train_counts) if n >= low and (high is None or n <= high)]
        seen = sum(report.per_class[c].support for c in members)
        hits = sum(report.confusion[c][c] for c in members)
        groups[name] = hits / seen if seen else None
    return groups
