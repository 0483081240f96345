"""Training losses for unequal class counts (`--balance`).

- none: cross-entropy.
- reweight: cross-entropy with inverse-frequency class weights, w_c = N / (C * n_c), from the real
  per-class training counts (weights that come out all equal would be a no-op, not a balance).
- resample: plain cross-entropy on a class-balanced sampler (vpt_cli.data.loading); the linear
  probe, which sees every image once, uses the reweighted loss, its expectation.
- logit-adjust: Menon et al. 2021, "Long-tail learning via logit adjustment": the loss sees
  logits + tau * log(prior), so the learned logits end up shifted by -tau * log(prior) and
  argmax at test time (plain logits) favours the rare classes as a balanced error needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vpt_cli.config import BALANCES, DEFAULT_TAU, LONG_TAIL_RATIO


@dataclass(frozen=True)
class ClassBalance:
    """How training treats unequal class counts: a mode of BALANCES and the training counts."""

    mode: str = "none"
    counts: tuple[int, ...] = ()
    tau: float = DEFAULT_TAU

    def __post_init__(self) -> None:
        if self.mode not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, not '{self.mode}'")

    @property
    def resamples(self) -> bool:
        """Whether the training loader should draw classes equally often."""
        return self.mode == "resample"

    @property
    def long_tailed(self) -> bool:
        """Whether it balances classes whose training counts differ by LONG_TAIL_RATIO or more
        (the smallest present class against the largest): where `--refit-head auto` refits."""
        present = [n for n in self.counts if n > 0]
        return self.mode != "none" and bool(present) and max(present) >= LONG_TAIL_RATIO * min(present)

    def weights(self) -> Tensor:
        """Inverse-frequency class weights N / (C * n_c): every class carries the same total weight, and the
        mean weight over the training images is 1 (a class without images gets 0)."""
        counts = torch.tensor(self.counts, dtype=torch.float64)
        present = counts > 0
        weights = torch.zeros_like(counts)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        return weights.float()

    def log_prior(self) -> Tensor:
        """log of the training class frequencies; a class without images counts as one, so it stays finite."""
        counts = torch.tensor(self.counts, dtype=torch.float64).clamp(min=1)
        return (counts / counts.sum()).log().float()

    def loss(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """The training loss for one batch: its mean, or with `reduction` "sum" the numerator of
        that mean, whose denominator is `batch_weight` (so data-parallel processes can share it)."""
        return self._loss(self.mode, logits, labels, reduction)

    def batch_weight(self, labels: Tensor) -> float:
        """What the batch's mean loss divides by: the images' class weights under reweight (as
        torch's weighted cross-entropy does), else the number of images."""
        if self.mode == "reweight":
            return float(self.weights()[labels.cpu()].sum())
        return float(len(labels))

    def probe_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The linear probe's loss: it fits on every image once, so resampling becomes its expectation."""
        return self._loss("reweight" if self.resamples else self.mode, logits, labels)

    def _loss(self, mode: str, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        if mode == "reweight":
            return F.cross_entropy(logits, labels, weight=self.weights().to(logits), reduction=reduction)
        if mode == "logit-adjust":
            return F.cross_entropy(logits + self.tau * self.log_prior().to(logits), labels, reduction=reduction)
        return F.cross_entropy(logits, labels, reduction=reduction)
