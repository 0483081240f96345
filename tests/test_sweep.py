"""`vpt sweep`: grid order, budgets, successive halving, the CSV of trials and the kept winner."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY_KWARGS, tiny_config
from typer.testing import CliRunner

from vpt_cli.artifact.home import resolve_task_path
from vpt_cli.artifact.schema import read_task_info
from vpt_cli.cli.app import app
from vpt_cli.config import RunConfig, TrainConfig
from vpt_cli.core.errors import UsageError
from vpt_cli.training import sweep

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def test_grid_runs_cheapest_first_and_a_cut_budget_still_spans_every_value():
    plan = sweep.plan_sweep([1e-3, 1e-2, 1e-1], [0.0, 1e-2, 1e-1], [10, 2], epochs=27)
    assert [t.num_prompts for t in plan.trials] == [2] * 9 + [10] * 9
    assert plan.rungs == [3, 9, 27]
    first = plan.trials[:3]
    assert {t.lr for t in first} == {1e-3, 1e-2, 1e-1} and {t.weight_decay for t in first} == {0.0, 1e-2, 1e-1}
    assert len({(t.num_prompts, t.lr, t.weight_decay) for t in plan.trials}) == 18
    assert len(sweep.plan_sweep([1e-3, 1e-2], [0.0], [5], epochs=4, budget="1").trials) == 1


@pytest.mark.parametrize("epochs, eta, rungs", [(30, 3, [3, 10, 30]), (2, 3, [2]), (8, 2, [2, 4, 8]), (1, 3, [1])])
def test_rungs(epochs, eta, rungs):
    assert sweep.rung_epochs(epochs, eta) == rungs


@pytest.mark.parametrize("text, parsed", [("12", (12, None)), ("15m", (None, 900.0)), ("90s", (None, 90.0)),
                                          ("1h", (None, 3600.0)), (None, (None, None))])
def test_budget_parsing(text, parsed):
    assert sweep.parse_budget(text) == parsed


@pytest.mark.parametrize("text", ["0", "ten", "5x", "-3m"])
def test_bad_budgets_are_usage_errors(text):
    with pytest.raises(UsageError, match="--budget"):
        sweep.parse_budget(text)


def test_successive_halving_stops_the_weak_and_keeps_the_best_as_the_task(tiny_weights):
    config = RunConfig(backbone=tiny_config(weights=str(tiny_weights)), train=TrainConfig(epochs=3, patience=0))
    config.prompt.num_prompts = 2
    config.data.path, config.data.workers = str(SAMPLE), 0
    # lr 0 cannot move off the probe; lr 50 wrecks the prompts: neither should win against lr 1e-2.
    plan = sweep.plan_sweep([0.0001, 1e-2, 50.0], [1e-4], [2], epochs=3, eta=3)
    seen: list[list[str]] = []

    class Recorder(sweep.SweepReporter):
        def trials_changed(self, trials):
            seen.append([t.status for t in trials])

    result = sweep.run_sweep(config, plan, task="swept", reporter=Recorder())
    trials = plan.trials
    assert plan.rungs == [1, 3]
    assert sum(t.status.startswith("stopped@1") for t in trials) == 2  # 3 trials, eta 3: one goes on
    assert [t.epochs_run for t in trials if not t.status.startswith("stopped")] == [3]
    assert result.best.status == "done (best)" and result.best.epochs_run == 3
    assert any("running" in statuses for statuses in seen)

    rows = list(csv.DictReader(result.csv_path.open()))
    assert [int(r["index"]) for r in rows] == [0, 1, 2] and all(r["val_top1"] for r in rows)
    best_row = next(r for r in rows if r["status"].endswith("(best)"))
    finished = [float(r["val_top1"]) for r in rows if r["status"].startswith("done")]
    assert float(best_row["val_top1"]) == max(finished)

    info = read_task_info(resolve_task_path("swept"))
    assert info.provenance["config"]["train"]["lr"] == result.best.lr
    assert info.provenance["sweep"]["trials"] == 3
    assert info.metrics["val_top1"] == pytest.approx(result.best.val_top1)


def test_sweep_command_end_to_end_with_a_trial_budget(tiny_weights):
    flags = ["--backbone", "vit_tiny_patch16_224", "--backbone-weights", str(tiny_weights), "--img-size", "32"]
    for key, value in TINY_KWARGS.items():
        flags += ["--backbone-arg", f"{key}={value}"]
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(SAMPLE), "--task", "cli", *flags, "--epochs", "1", "--prompts", "1,2",
                                 "--lr", "1e-2", "--weight-decay", "0,1e-3", "--budget", "3", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [t["num_prompts"] for t in payload["trials"]] == [1, 1, 2]
    assert payload["task"]["task"] == "cli" and Path(payload["csv"]).is_file()

    linear = runner.invoke(app, ["sweep", str(SAMPLE), *flags, "--method", "linear"])
    assert linear.exit_code == 2 and "nothing to sweep" in linear.output
    bad = runner.invoke(app, ["sweep", str(SAMPLE), *flags, "--lr", "fast"])
    assert bad.exit_code == 2 and "--lr" in bad.output
