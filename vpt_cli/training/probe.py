"""The linear probe: pooled features once, then an L2-regularised logistic regression (Newton).

It is both a baseline (`--method linear`) and the head every prompt run starts from
("LP then tune", README "Defaults").
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from vpt_cli.models.prompted import PromptedViT
from vpt_cli.objectives import Objective
from vpt_cli.objectives.single_label import SingleLabel
from vpt_cli.runtime import distributed
from vpt_cli.runtime.context import RunContext
from vpt_cli.runtime.device import autocast

PROBE_WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4)  # strongest first: ties keep the smaller head
# At most this many Newton steps per fit; a fit ends sooner once its gradient's norm is below
# PROBE_GRAD_TOL. Measured: 7 to 15 steps from 1e-1 to 1e-4, and only a converged fit is the same
# whatever the thread or process count.
PROBE_STEPS = 100
PROBE_GRAD_TOL = 1e-9
PROBE_TIE = 1e-6  # val scores closer than this are equal (accuracies differ by at least 1/n when they differ)


@torch.no_grad()  # not inference_mode: the probe fit needs autograd on these features
def extract_features(model: PromptedViT, loader: Iterable, context: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of the (prompted) backbone and labels for every batch, in fp32 on CPU; from
    every process in dataset order when the loader is sharded (so each fits the same probe)."""
    device, amp, reporter = context.device, context.amp, context.reporter
    model.eval()
    features, labels, indices = [], [], []
    reporter.start("features", len(loader))
    for batch in loader:
        if batch is None:
            continue
        images, targets, index = batch
        with autocast(device, amp):
            features.append(model.forward_features(images.to(device)).float().cpu())
        labels.append(targets)
        indices.append(index)
        reporter.advance(len(targets))
    reporter.finish()
    if not features:  # nothing readable here (another process may have some)
        features, labels, indices = [torch.empty(0, model.head.in_features)], [torch.empty(0, dtype=torch.long)], [
            torch.empty(0, dtype=torch.long)]
    all_features, all_labels = distributed.gather_rows(torch.cat(indices), torch.cat(features), torch.cat(labels))
    return all_features, all_labels


class _ProbeLoss:
    """The probe's regularised loss over one flat float64 vector (weights, then biases), with the
    gradient and the Hessian-vector products that a Newton solver asks for, by autograd, so any
    objective's (twice differentiable) probe loss works unchanged."""

    def __init__(self, *, centred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 weight_decay: float, objective: Objective):
        self.centred, self.labels, self.objective = centred, labels, objective
        self.num_classes, self.weight_decay = num_classes, weight_decay
        self._graph: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        split = self.num_classes * self.centred.shape[1]
        return theta[:split].view(self.num_classes, -1), theta[split:]

    def _loss(self, theta: torch.Tensor) -> torch.Tensor:
        weight, bias = self.split(theta)
        return (self.objective.probe_loss(self.centred @ weight.T + bias, self.labels)
                + 0.5 * self.weight_decay * weight.square().sum())

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = torch.from_numpy(x).requires_grad_(True)
        loss = self._loss(theta)
        (grad,) = torch.autograd.grad(loss, theta)
        return loss.item(), grad.numpy()

    def hessp(self, x: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """H(x) @ vector; the gradient's graph at x is kept for the next product at the same x
        (the solver asks for many there while it solves for one step)."""
        if self._graph is None or not np.array_equal(self._graph[0], x):
            theta = torch.from_numpy(x.copy()).requires_grad_(True)
            (grad,) = torch.autograd.grad(self._loss(theta), theta, create_graph=True)
            self._graph = (x.copy(), theta, grad)
        _, theta, grad = self._graph
        (product,) = torch.autograd.grad(grad, theta, torch.from_numpy(vector), retain_graph=True)
        return product.numpy()


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    weight_decay: float, steps: int = PROBE_STEPS, objective: Objective = SingleLabel()) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression (L2 on the weights): the linear probe's solution under the run's
    objective: multinomial with its class balance, or one binary regression per class (multi-label).

    Solved to convergence, because only the optimum is the same whatever the thread or process
    count: those change how float32 sums are grouped, and an unconverged fit turns that last-bit
    noise in the features into a different head (measured: a bias 0.18 apart). Float64, so the
    loss resolves progress far below float32's noise. Centred features: `W x + b = W (x - mean) +
    (b + W mean)` and the bias carries no L2, so the optimum is the same, but the weights no longer
    drag the bias along a narrow valley. And a trust-region Newton solver (SciPy's `trust-ncg`,
    conjugate gradients on Hessian-vector products) instead of L-BFGS: weakly regularised fits are
    ill-conditioned, and measured on a 64-dim, 4-class probe at L2 1e-4, torch's L-BFGS had not
    converged after 1250 evaluations (3.6 s, the gradient still 3e-7) where Newton reaches 2e-10
    in 10 steps (0.3 s). Returns float32 tensors."""
    from scipy.optimize import minimize  # here, not at the top: only training pays its import (0.7 s)

    features = features.double()
    mean = features.mean(0) if len(features) else torch.zeros(features.shape[1], dtype=torch.float64)
    problem = _ProbeLoss(centred=features - mean, labels=labels, num_classes=num_classes,
                         weight_decay=weight_decay, objective=objective)
    start = np.zeros(num_classes * (features.shape[1] + 1))
    solution = minimize(problem.value_and_grad, start, jac=True, hessp=problem.hessp, method="trust-ncg",
                        options={"maxiter": steps, "gtol": PROBE_GRAD_TOL})
    weight, bias = problem.split(torch.from_numpy(solution.x))
    return weight.float(), (bias - weight @ mean).float()


def probe_init_head(model: PromptedViT, train_loader: Iterable, val_loader: Iterable | None, context: RunContext,
                    objective: Objective = SingleLabel()) -> float | None:
    """Set the head to the best linear probe on the model's initial features (LP-then-tune).

    The probe's L2 strength is picked on the val split when there is one. Training then starts
    at the probe's accuracy instead of chance, which is what lets prompts beat the probe on
    small folders (see README, "Defaults"). When balancing classes, the strength is picked by
    balanced accuracy, which is what balancing is for; for multi-label tasks by val mAP. Returns
    the probe's val score.
    """
    train_x, train_y = extract_features(model, train_loader, context)
    val_x, val_y = extract_features(model, val_loader, context) if val_loader else (None, None)
    num_classes = model.head.out_features
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    # Ties go to the smaller (more regularised) head, whose logits leave the prompts room to learn;
    # a score within PROBE_TIE of the best so far is a tie, so float noise cannot flip the pick.
    for decay in PROBE_WEIGHT_DECAYS if val_x is not None and len(val_x) else (1e-3,):
        weight, bias = fit_linear_head(train_x, train_y, num_classes, decay, objective=objective)
        score = (objective.probe_score(val_x @ weight.T + bias, val_y)
                 if val_x is not None and len(val_x) else 0.0)
        if best is None or score > best[0] + PROBE_TIE:
            best = (score, weight, bias)
    assert best is not None
    with torch.no_grad():
        model.head.weight.copy_(best[1])
        model.head.bias.copy_(best[2])
    context.reporter.log(f"linear probe head: val {objective.score_name} {best[0]:.4f}")
    return best[0] if val_x is not None and len(val_x) else None
