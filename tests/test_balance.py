"""--balance: inverse-frequency weights, a class-balanced sampler, the logit-adjusted loss, and the
long-tail metrics eval reports."""
from __future__ import annotations

import pytest
import torch
from test_readers import make_csv, run_config
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.cli.app import app
from vpt_cli.config import BALANCES
from vpt_cli.data.loading import class_balanced_sampler
from vpt_cli.evaluation.metrics import classification_report, shot_group_accuracy
from vpt_cli.objectives.balance import ClassBalance

COUNTS = (200, 20, 2)


def test_reweight_uses_the_real_counts_so_the_weights_differ():
    weights = ClassBalance("reweight", COUNTS).weights()
    assert len(set(weights.tolist())) == 3  # not all equal
    assert torch.allclose(weights * torch.tensor(COUNTS, dtype=torch.float), torch.full((3,), sum(COUNTS) / 3))
    assert (weights * torch.tensor(COUNTS)).sum().item() / sum(COUNTS) == pytest.approx(1.0)  # mean 1 per image
    logits, labels = torch.randn(8, 3), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    plain = ClassBalance("none", COUNTS).loss(logits, labels)
    assert ClassBalance("reweight", COUNTS).loss(logits, labels) != pytest.approx(plain.item())
    assert ClassBalance("resample", COUNTS).loss(logits, labels) == pytest.approx(plain.item())  # the sampler balances
    assert ClassBalance("resample", COUNTS).probe_loss(logits, labels) == pytest.approx(
        ClassBalance("reweight", COUNTS).loss(logits, labels).item())


def test_the_sampler_draws_classes_equally_often():
    labels = [c for c, n in enumerate(COUNTS) for _ in range(n)]
    generator = torch.Generator().manual_seed(0)
    drawn = [labels[i] for _ in range(20) for i in class_balanced_sampler(labels, generator)]
    shares = torch.bincount(torch.tensor(drawn), minlength=3).float() / len(drawn)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.02), shares
    again = list(class_balanced_sampler(labels, torch.Generator().manual_seed(0)))
    assert again == list(class_balanced_sampler(labels, torch.Generator().manual_seed(0)))  # seeded


def fit_bias(balance: ClassBalance) -> torch.Tensor:
    """The loss optimum over a bias-only classifier on labels drawn with the counts' prior."""
    labels = torch.tensor([c for c, n in enumerate(balance.counts) for _ in range(n)])
    bias = torch.zeros(len(balance.counts), requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = balance.loss(bias.expand(len(labels), -1), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return bias.detach() - bias.detach().mean()


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_logit_adjustment_shifts_the_optimum_by_tau_log_prior(tau):
    plain = fit_bias(ClassBalance("none", COUNTS))
    adjusted = fit_bias(ClassBalance("logit-adjust", COUNTS, tau))
    log_prior = ClassBalance("none", COUNTS).log_prior()
    shift = -tau * (log_prior - log_prior.mean())
    assert torch.allclose(adjusted - plain, shift, atol=1e-3)
    assert torch.allclose(plain, log_prior - log_prior.mean(), atol=1e-3)  # plain CE learns the prior


def test_shot_groups_split_classes_by_training_count():
    logits = torch.eye(3)[[0, 0, 1, 2, 1]]  # the last image (class 2) is wrong
    report = classification_report(logits, torch.tensor([0, 0, 1, 2, 2]), ["a", "b", "c"])
    assert shot_group_accuracy(report, [500, 50, 5]) == {"many": 1.0, "medium": 1.0, "few": 0.5}
    assert shot_group_accuracy(report, [500, 101, 100]) == {"many": 1.0, "medium": 0.5, "few": None}  # 101: many
    assert shot_group_accuracy(report, [5, 5, 5])["many"] is None


@pytest.mark.parametrize("balance", BALANCES)
def test_every_balance_mode_trains_and_eval_reports_the_groups(tiny_weights, tmp_path, balance):
    data = make_csv(tmp_path / "data")
    lines = data.read_text().splitlines()
    data.write_text("\n".join(line for line in lines if not ("bee_" in line and line.endswith("train")
                                                              and line.split("_")[1][0] in "123")) + "\n")
    config = run_config(tiny_weights, data)
    config.train.balance = balance
    result = api.train(config, task=f"bal-{balance}")
    assert result.num_train == 9
    evaluated = api.evaluate(data, result.task_path, output_dir=tmp_path / "eval")
    assert evaluated.report.shot_groups == {"many": None, "medium": None, "few": pytest.approx(evaluated.report.top1)}


@pytest.mark.parametrize("flag, value, message", [("--balance", "oversample", "'oversample' is not one of"),
                                                  ("--tau", "-1", "--tau must be in")])
def test_bad_balance_options_are_usage_errors(tmp_path, flag, value, message):
    done = CliRunner().invoke(app, ["train", str(tmp_path), flag, value])
    assert done.exit_code == 2 and message in done.stderr, done.stderr
