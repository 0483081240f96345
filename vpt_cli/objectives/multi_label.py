"""Several labels per image: each class is a yes/no question on its own sigmoid score.

Training fits binary cross-entropy (or `--loss asl`, timm's asymmetric loss), optionally with
per-class positive weights (`--balance`); the probe and model selection maximise val mAP, which
needs no threshold; after training one threshold per class is tuned on val for that class's F1
and stored in the task file, which answers with every class whose score reaches its threshold.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vpt_cli.evaluation.multilabel import (
    FALLBACK_THRESHOLD,
    MultiLabelAccumulator,
    MultiLabelReport,
    mean_average_precision,
    tune_thresholds,
)
from vpt_cli.objectives.balance import ClassBalance
from vpt_cli.objectives.base import MULTI_LABEL, Answer, Objective


def positive_weights(balance: ClassBalance, num_images: int) -> tuple[float, ...] | None:
    """Per-class weights of the positive term, negatives / positives from the training counts, so
    every class's positives weigh as much as its negatives; None under balance "none". A class
    without positives (refused by the readers) counts one."""
    if balance.mode == "none":
        return None
    return tuple((num_images - count) / max(count, 1) for count in balance.counts)


@dataclass(frozen=True)
class MultiLabel(Objective):
    """`loss_kind` bce | asl; `pos_weight` one per class or None; `thresholds` one per class
    (empty: FALLBACK_THRESHOLD for each); `tune` whether `tuned` refits them on val."""

    name: ClassVar[str] = MULTI_LABEL
    multi_label: ClassVar[bool] = True
    score_columns: ClassVar[tuple[str, str]] = ("val_map", "val_macro_f1")
    score_name: ClassVar[str] = "mAP"

    loss_kind: str = "bce"
    pos_weight: tuple[float, ...] | None = None
    thresholds: tuple[float, ...] = ()
    tune: bool = True

    @classmethod
    def from_task(cls, thresholds: list[float] | None) -> "MultiLabel":
        return cls(thresholds=tuple(thresholds or ()), tune=False)

    def task_thresholds(self) -> list[float] | None:
        return list(self.thresholds)

    def _thresholds(self, num_classes: int) -> list[float]:
        return list(self.thresholds) if self.thresholds else [FALLBACK_THRESHOLD] * num_classes

    def _pos_weight(self, like: Tensor) -> Tensor | None:
        return None if self.pos_weight is None else torch.tensor(self.pos_weight, dtype=like.dtype, device=like.device)

    def loss(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Summed over classes, averaged over images (or with "sum" summed over both)."""
        targets = targets.to(logits.dtype)
        if self.loss_kind == "asl":
            from timm.loss import AsymmetricLossMultiLabel

            summed = AsymmetricLossMultiLabel(reduction="sum", pos_weight=self._pos_weight(logits))(logits, targets)
        else:
            summed = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self._pos_weight(logits),
                                                        reduction="sum")
        return summed if reduction == "sum" else summed / max(len(targets), 1)

    def batch_weight(self, targets: Tensor) -> float:
        return float(len(targets))

    def probe_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Binary cross-entropy (with the positive weights) whatever the training loss: a convex fit."""
        return replace(self, loss_kind="bce").loss(logits, targets)

    def eval_loss_sum(self, logits: Tensor, targets: Tensor) -> float:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum").item()

    def correct(self, logits: Tensor, targets: Tensor) -> int:
        """Images whose every class is answered right (exact match) at the thresholds."""
        answered = self.scores(logits.detach().float()) >= torch.tensor(self._thresholds(logits.shape[1]),
                                                                        device=logits.device)
        return int((answered == targets.bool()).all(1).sum().item())

    def probe_score(self, logits: Tensor, targets: Tensor) -> float:
        return mean_average_precision(self.scores(logits), targets)

    def selection_key(self, report: MultiLabelReport) -> tuple[float, float]:
        """Val mAP, ties to the lower val loss."""
        return report.mean_ap, -(report.loss or 0.0)

    def accumulator(self, num_classes: int) -> MultiLabelAccumulator:
        return MultiLabelAccumulator(self._thresholds(num_classes))

    @property
    def tunes_on_val(self) -> bool:
        return self.tune

    def tuned(self, logits: Tensor, targets: Tensor) -> "MultiLabel":
        """Per-class thresholds that maximise each class's F1 on these val logits."""
        if not self.tune:
            return self
        return replace(self, thresholds=tuple(tune_thresholds(self.scores(logits), targets)))

    def scores(self, logits: Tensor) -> Tensor:
        return logits.sigmoid()

    def answer(self, logits: Tensor, classes: list[str], k: int | None) -> Answer:
        """Every class whose score reaches its threshold, best first; with `k`, the `k` best scores whatever they are."""
        probs = self.scores(logits[: len(classes)].float())
        if k is not None:
            values, index = probs.topk(min(k, len(classes)))
        else:
            over = (probs >= torch.tensor(self._thresholds(len(classes)))).nonzero().flatten()
            values, order = probs[over].sort(descending=True, stable=True)
            index = over[order]
        return [(classes[c], float(v)) for v, c in zip(values.tolist(), index.tolist())]
