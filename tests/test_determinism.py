"""The same run on a different thread count picks the same hyper-parameters: the linear probe is
fitted in float64 to convergence and near-equal val scores are ties, so float noise in how sums
are grouped (which changes with threads and processes) cannot flip its L2 pick."""
from __future__ import annotations

import torch
from conftest import tiny_config
from test_cli import SAMPLE

from vpt_cli import api
from vpt_cli.artifact.schema import load_task
from vpt_cli.config import RunConfig, TrainConfig
from vpt_cli.objectives.single_label import SingleLabel
from vpt_cli.runtime.context import RunContext
from vpt_cli.training import probe


class _Features(torch.nn.Module):
    """A stand-in prompted model whose pooled features are given."""

    def __init__(self, features: torch.Tensor, classes: int):
        super().__init__()
        self.features = features
        self.head = torch.nn.Linear(features.shape[1], classes)

    def forward_features(self, index: torch.Tensor) -> torch.Tensor:
        return self.features[index]


def _train(weights, threads: int, name: str):
    config = RunConfig(backbone=tiny_config(weights=str(weights)),
                       train=TrainConfig(epochs=2, batch_size=25, seed=3, select="last"))
    config.prompt.num_prompts, config.prompt.dropout = 2, 0.0
    config.data.path, config.data.augment, config.data.workers = str(SAMPLE), "none", 0
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = api.train(config, task=name)
    finally:
        torch.set_num_threads(previous)
    return result, load_task(result.task_path).tensors


def test_one_and_two_threads_pick_the_same_and_train_nearly_the_same(tiny_weights):
    """Measured on this run: a float32 probe of 100 L-BFGS steps left the two tasks 0.11-0.39
    apart, and a float64 one of 300 steps on raw features 7.5e-4 (its weakly regularised fits had
    not converged, so last-bit noise moved them); centred features, a stop on the gradient and a
    Newton solver leave them 1.2e-5 apart."""
    one, one_tensors = _train(tiny_weights, 1, "one")
    two, two_tensors = _train(tiny_weights, 2, "two")
    assert one.probe_val_acc == two.probe_val_acc and one.best_epoch == two.best_epoch
    assert max((one_tensors[k] - two_tensors[k]).abs().max().item() for k in one_tensors) < 1e-4


def test_scores_within_the_tie_keep_the_stronger_l2(monkeypatch):
    """Every strength scores alike (up to noise below PROBE_TIE): the first, strongest, is kept."""
    scores = iter([0.5, 0.5 + probe.PROBE_TIE / 2, 0.5 - probe.PROBE_TIE / 2, 0.5 + probe.PROBE_TIE / 3])
    monkeypatch.setattr(SingleLabel, "probe_score", lambda self, logits, labels: next(scores))
    kept = []
    fit = probe.fit_linear_head
    monkeypatch.setattr(probe, "fit_linear_head", lambda *a, **k: kept.append(a[3]) or fit(*a, **k))
    torch.manual_seed(0)
    features, labels = torch.randn(40, 8), torch.arange(40) % 2
    model = _Features(features, 2)
    batches = [(torch.arange(0, 40), labels, torch.arange(40))]
    probe.probe_init_head(model, batches, batches, RunContext(), SingleLabel())
    strongest = fit(features, labels, 2, probe.PROBE_WEIGHT_DECAYS[0])
    assert kept == list(probe.PROBE_WEIGHT_DECAYS)
    assert torch.equal(model.head.weight.detach(), strongest[0])
