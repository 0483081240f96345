"""--balance: inverse-frequency weights, a class-balanced sampler, the logit-adjusted loss, and the
long-tail metrics eval reports."""
from __future__ import annotations

import pytest
import torch
from test_readers import make_csv, run_config
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.artifact.schema import load_task
from vpt_cli.cli.app import app
from vpt_cli.config import BALANCES, LONG_TAIL_RATIO
from vpt_cli.data import ImageDataset, build_transform, discover_splits, make_loader
from vpt_cli.data.loading import class_balanced_sampler
from vpt_cli.evaluation.metrics import classification_report, shot_group_accuracy
from vpt_cli.objectives.balance import ClassBalance
from vpt_cli.objectives.single_label import SingleLabel
from vpt_cli.runtime.context import RunContext
from vpt_cli.serving.loading import load_for_inference
from vpt_cli.training.probe import PROBE_WEIGHT_DECAYS, extract_features, fit_linear_head

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
    data = long_tailed_csv(tmp_path / "data")
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


@pytest.mark.parametrize("mode, counts, long_tailed", [
    ("logit-adjust", (200, 20, 2), True),
    ("reweight", (30, 10), True),  # exactly LONG_TAIL_RATIO
    ("resample", (29, 10), False),  # just below it
    ("logit-adjust", (50, 0, 10), True),  # an empty class is not the smallest one
    ("none", (200, 20, 2), False),  # nothing balanced, nothing to undo
    ("logit-adjust", (), False),
])
def test_long_tailed_is_a_balance_over_classes_three_times_apart(mode, counts, long_tailed):
    balance = ClassBalance(mode, counts)
    assert LONG_TAIL_RATIO == 3.0
    assert balance.long_tailed is long_tailed
    assert SingleLabel(balance=balance).refits_head_by_default is long_tailed


def long_tailed_csv(root):
    """make_csv's three classes with bee down to one training image (4, 4, 1: long-tailed)."""
    data = make_csv(root)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(line for line in lines if not ("bee_" in line and line.endswith("train")
                                                              and line.split("_")[1][0] in "123")) + "\n")
    return data


def final_features(task, weights, data):
    """Pooled training features of a saved task's prompted model, as the run's probe loader reads them."""
    loaded = load_for_inference(task, str(weights), "cpu")
    samples = discover_splits(data).train
    loader = make_loader(ImageDataset(samples, build_transform(loaded.backbone.data_config, train=False)), 8, False, 0, 0)
    return loaded, extract_features(loaded.model, loader, RunContext())


def test_refit_head_fits_the_probe_on_the_final_features_and_leaves_the_prompts(tiny_weights, tmp_path):
    data = long_tailed_csv(tmp_path / "data")
    tasks = {}
    for choice in ("auto", "never"):
        config = run_config(tiny_weights, data)
        config.train.refit_head = choice
        tasks[choice] = api.train(config, task=f"refit-{choice}")
    refit, trained = (load_task(tasks[c].task_path) for c in ("auto", "never"))
    assert refit.info.provenance["head_refit"] is True and trained.info.provenance["head_refit"] is False
    for name, tensor in trained.tensors.items():  # the same training run: only the head differs
        assert torch.equal(refit.tensors[name], tensor) != name.startswith("head."), name
    # Independently: the probe on the final features, under the run's balance, at one of the probe's strengths.
    loaded, (x, y) = final_features(tasks["auto"].task_path, tiny_weights, data)
    objective = SingleLabel(balance=ClassBalance("logit-adjust", tuple(torch.bincount(y, minlength=3).tolist())))
    fits = [fit_linear_head(x, y, 3, decay, objective=objective) for decay in PROBE_WEIGHT_DECAYS]
    head = loaded.model.head
    assert any(torch.allclose(head.weight, w, atol=1e-4) and torch.allclose(head.bias, b, atol=1e-4) for w, b in fits)
    best = load_task(tasks["auto"].run_dir / "best.safetensors")  # the run folder's best is the published task
    assert all(torch.equal(best.tensors[name], t) for name, t in refit.tensors.items())


@pytest.mark.parametrize("choice, balance, refits", [("auto", "none", False), ("always", "none", True)])
def test_refit_head_auto_leaves_unbalanced_runs_and_always_refits(tiny_weights, tmp_path, choice, balance, refits):
    config = run_config(tiny_weights, long_tailed_csv(tmp_path / "data"))
    config.train.refit_head, config.train.balance = choice, balance
    result = api.train(config, task=f"refit-{choice}")
    assert load_task(result.task_path).info.provenance["head_refit"] is refits
