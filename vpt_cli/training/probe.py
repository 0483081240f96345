"""The linear probe: pooled features once, then an L2-regularised logistic regression (L-BFGS).

It is both a baseline (`--method linear`) and the head every prompt run starts from
("LP then tune", README "Defaults").
"""
from __future__ import annotations

from typing import Iterable

import torch

from vpt_cli.models.prompted import PromptedViT
from vpt_cli.objectives import Objective
from vpt_cli.objectives.single_label import SingleLabel
from vpt_cli.runtime import distributed
from vpt_cli.runtime.context import RunContext
from vpt_cli.runtime.device import autocast

PROBE_WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4)  # strongest first: ties keep the smaller head
# At most this many L-BFGS iterations per fit; a fit ends sooner once its gradient is below
# PROBE_GRAD_TOL. Weakly regularised fits need several hundred, and only a converged fit is the
# same whatever the thread or process count.
PROBE_STEPS = 1000
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


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    weight_decay: float, steps: int = PROBE_STEPS, objective: Objective = SingleLabel()) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression (L2 on the weights, L-BFGS): the linear probe's solution under the run's
    objective: multinomial with its class balance, or one binary regression per class (multi-label).

    Solved to convergence, because only the optimum is the same whatever the thread or process
    count: those change how float32 sums are grouped, and an unconverged fit turns that last-bit
    noise in the features into a different head (measured: a bias 0.18 apart). Three things get it
    there. Float64, so the loss resolves progress far below float32's noise. Centred features:
    `W x + b = W (x - mean) + (b + W mean)` and the bias carries no L2, so the optimum is the same,
    but the weights no longer drag the bias along a narrow valley (a 1e-4 fit converges in a few
    hundred steps instead of stalling). And a stop on the gradient, not on the change of the loss,
    which stalls at float64's resolution while the flat directions are still far from the optimum.
    Returns float32 tensors."""
    features = features.double()
    mean = features.mean(0) if len(features) else torch.zeros(features.shape[1], dtype=torch.float64)
    centred = features - mean
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                                  tolerance_grad=PROBE_GRAD_TOL, tolerance_change=0.0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective.probe_loss(centred @ weight.T + bias, labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
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
