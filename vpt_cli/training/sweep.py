"""`vpt sweep`: the paper's hyperparameter search on the val split, made affordable on a CPU.

The paper picks lr and weight decay (and sometimes the prompt length) per task on a held-out
split. Here every grid point is a `TrainingRun` on the same data and the same frozen backbone;
trials advance together through successive-halving rungs (epochs E/eta^2, E/eta, E), and after
each rung only the best 1/eta of them, by the val score of the weights each would keep (its best
epoch, or its latest under `train.select` last/auto on a small val split), keep training. All trials share
one schedule length (E epochs), so a survivor simply continues; nothing is retrained.

The winner's kept weights become the task (it is not retrained on train+val: with few images
the val split is also what picks the trial, and retraining would double the cost).
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vpt_cli.config import RunConfig
from vpt_cli.core.errors import UsageError
from vpt_cli.core.fileio import atomic_write
from vpt_cli.data.splits import DatasetSplits
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.runtime.context import RunContext
from vpt_cli.runtime.device import seed_everything
from vpt_cli.runtime.reporting import Reporter
from vpt_cli.training.engine import TrainingRun
from vpt_cli.training.outputs import TrainResult, save_trained
from vpt_cli.training.prepare import check_run, prepare_run
from vpt_cli.training.run_folder import ClaimedTask, RunFolder, claim_task

CSV_FIELDS = ("index", "num_prompts", "fourier_fraction", "lr", "weight_decay", "status", "epochs_run", "best_epoch",
              "val_top1", "val_loss", "seconds")


@dataclass
class Trial:
    """One grid point and how far it got."""

    index: int
    num_prompts: int | None  # None = auto, resolved by run_sweep once the backbone is loaded
    lr: float
    weight_decay: float
    fourier_fraction: float | None = None  # vfpt's; None: the config's (or a method without one)
    status: str = "queued"  # queued | running | stopped@<epoch> | done | not run (budget)
    epochs_run: int = 0
    best_epoch: int = 0
    val_top1: float | None = None
    val_loss: float | None = None
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CSV_FIELDS}


class SweepReporter:
    """Progress of a sweep; the CLI shows it as a live table. Every method is optional."""

    def trials_changed(self, trials: list[Trial]) -> None:
        """A trial started, finished an epoch or was stopped."""

    def log(self, message: str) -> None:
        """A line worth keeping."""


@dataclass
class SweepPlan:
    """The grid in the order trials are started, and what bounds the search."""

    trials: list[Trial]
    rungs: list[int]  # epochs after which the weaker trials stop
    eta: int
    max_trials: int | None = None
    max_seconds: float | None = None
    budget_text: str = "whole grid"


def parse_budget(text: str | None) -> tuple[int | None, float | None]:
    """'12' -> at most 12 trials; '15m' / '90s' / '1h' -> a wall-clock limit. None: no limit."""
    if not text:
        return None, None
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            seconds = float(text[:-1]) * units[text[-1]]
            if seconds <= 0:
                raise ValueError
            return None, seconds
        trials = int(text)
        if trials < 1:
            raise ValueError
        return trials, None
    except ValueError:
        raise UsageError(f"--budget takes a number of trials (12) or minutes (15m, also 90s, 1h), not '{text}'") from None


def rung_epochs(epochs: int, eta: int) -> list[int]:
    """Epochs at which trials are compared: E/eta^k, ..., E/eta, E (each at least 1, no repeats)."""
    rungs, value = [epochs], epochs
    while value // eta >= 1 and len(rungs) < 3:
        value //= eta
        rungs.insert(0, value)
    return sorted(set(rungs))


def plan_sweep(lrs: list[float], weight_decays: list[float], prompt_lengths: list[int | None], epochs: int,
               eta: int = 3, budget: str | None = None,
               fourier_fractions: list[float | None] | None = None) -> SweepPlan:
    """Order the grid cheapest first (fewer prompts = fewer tokens); within one prompt length,
    walk diagonals of the lr x wd grid so that a budget cut short still spans every lr and wd, and
    rotate the Fourier fractions (vfpt) across those cells, one full lr x wd pass per fraction."""
    fractions = fourier_fractions or [None]
    if not lrs or not weight_decays or not prompt_lengths:
        raise UsageError("the sweep grid is empty: give at least one --lr, --weight-decay and --prompts value")
    if eta < 2:
        raise UsageError("--eta must be at least 2")
    if any(lr <= 0 for lr in lrs) or any(wd < 0 for wd in weight_decays) or any(p is not None and p < 1 for p in prompt_lengths):
        raise UsageError("sweep values must be lr > 0, weight decay >= 0 and prompts >= 1")
    if any(f is not None and not 0.0 <= f <= 1.0 for f in fractions):
        raise UsageError("sweep values of --fourier-fraction must be in [0, 1]")
    points = []
    n_lr, n_wd = len(lrs), len(weight_decays)
    for prompts in sorted(set(prompt_lengths)):
        cells = sorted(((i, j) for i in range(n_lr) for j in range(n_wd)), key=lambda c: ((c[1] - c[0]) % n_wd, c[0]))
        points += [(prompts, lrs[i], weight_decays[j], fractions[(c + turn) % len(fractions)])
                   for turn in range(len(fractions)) for c, (i, j) in enumerate(cells)]
    max_trials, max_seconds = parse_budget(budget)
    trials = [Trial(index, p, lr, wd, fraction)
              for index, (p, lr, wd, fraction) in enumerate(points[:max_trials] if max_trials else points)]
    return SweepPlan(trials, rung_epochs(epochs, eta), eta, max_trials, max_seconds, budget or "whole grid")


def trial_config(base: RunConfig, trial: Trial) -> RunConfig:
    """`base` with the trial's prompt length, Fourier fraction, lr and weight decay."""
    fraction = base.prompt.fourier_fraction if trial.fourier_fraction is None else trial.fourier_fraction
    return replace(base, prompt=replace(base.prompt, num_prompts=trial.num_prompts, fourier_fraction=fraction),
                   train=replace(base.train, lr=trial.lr, weight_decay=trial.weight_decay))


def write_trials_csv(trials: list[Trial], path: Path) -> None:
    """Every trial, run or not, one row each (rewritten after every rung)."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(trial.row() for trial in trials)

    atomic_write(path, write)


@dataclass
class SweepResult:
    plan: SweepPlan
    best: Trial
    train: TrainResult  # the saved winner
    csv_path: Path
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best.row(), "task": self.train.to_dict(), "csv": str(self.csv_path),
                "rungs": self.plan.rungs, "eta": self.plan.eta, "budget": self.plan.budget_text,
                "trials": [t.row() for t in self.plan.trials], "seconds": self.seconds}


def run_sweep(config: RunConfig, plan: SweepPlan, task: str | None = None, force: bool = False,
              reporter: SweepReporter | None = None, folder: RunFolder | None = None) -> SweepResult:
    """Run the plan with successive halving and save the winner as the task (see module doc)."""
    reporter = reporter or SweepReporter()
    if not config.prompt.info.prompts:
        raise UsageError(f"vpt sweep tunes prompt training; --method {config.prompt.method} has nothing to sweep "
                         "(linear picks its own L2 strength on val)")
    if config.data.trainval:
        raise UsageError("vpt sweep searches on the val split; retrain the winner with vpt train --trainval")
    if config.prompt.info.transform is None and any(t.fourier_fraction for t in plan.trials):
        raise UsageError(f"--fourier-fraction applies to vfpt and vfpt-shallow, not --method {config.prompt.method}")
    started = time.perf_counter()
    splits = check_run(config)
    with claim_task(config, task, force=force, folder=folder) as claimed:
        return _run_claimed(config, plan, claimed, splits, reporter, started)


def _run_claimed(config: RunConfig, plan: SweepPlan, claimed: ClaimedTask, splits: DatasetSplits,
                 reporter: SweepReporter, started: float) -> SweepResult:
    deadline = started + plan.max_seconds if plan.max_seconds else math.inf
    quiet = Reporter()
    prepared = prepare_run(config, claimed, splits, quiet)
    if prepared.val_loader is None:
        raise UsageError("vpt sweep needs a validation split: add a val/ folder or use --val-split > 0")
    for trial in plan.trials:  # an 'auto' length is the count prepare_run resolved for this backbone
        trial.num_prompts = trial.num_prompts or prepared.config.prompt.num_prompts
        if trial.fourier_fraction is None:
            trial.fourier_fraction = prepared.config.prompt.resolved_fraction
    runs: dict[int, TrainingRun] = {}
    # the probe head per prompt length and Fourier fraction (which change the features it was fitted on)
    starts: dict[tuple[int | None, float | None], tuple[dict[str, torch.Tensor], float | None]] = {}

    def advance(trial: Trial, until: int) -> None:
        """Create (first time) and train `trial` up to epoch `until`, keeping the table current."""
        began = time.perf_counter()
        trial.status = "running"
        reporter.trials_changed(plan.trials)
        if trial.index not in runs:
            seed_everything(config.train.seed)  # every trial of one prompt length starts from the same prompts
            trial_cfg = prepared.resolve(trial_config(config, trial))
            model = PromptedViT(prepared.backbone.model, len(prepared.classes), trial_cfg.prompt)
            run = TrainingRun(model, prepared.train_loader, prepared.val_loader, prepared.classes, trial_cfg.train,
                              RunContext(prepared.device, trial_cfg.train.amp, quiet), objective=prepared.objective)
            start_key = (trial.num_prompts, trial.fourier_fraction)
            run.start(prepared.probe_loader, starts.get(start_key))
            starts.setdefault(start_key, (run.best_state, run.state["probe_val_acc"]))
            runs[trial.index] = run
        run = runs[trial.index]
        while run.epoch < until and not run.should_stop:
            run.run_epoch()
            trial.epochs_run, trial.best_epoch = run.epoch, run.state["best_epoch"]
            trial.val_top1, trial.val_loss = run.best_key[0], -run.best_key[1]
            trial.seconds += time.perf_counter() - began
            began = time.perf_counter()
            reporter.trials_changed(plan.trials)
        trial.seconds += time.perf_counter() - began

    alive = list(plan.trials)
    for rung_index, rung in enumerate(plan.rungs):
        for trial in alive:
            if time.perf_counter() >= deadline:
                break
            advance(trial, rung)
            trial.status = "running" if rung < plan.rungs[-1] else "done"
        ran = [t for t in alive if t.index in runs and t.epochs_run > 0]
        ranked = sorted(ran, key=lambda t: (runs[t.index].best_key, -t.index), reverse=True)
        keep = max(1, math.ceil(len(ranked) / plan.eta)) if rung < plan.rungs[-1] else len(ranked)
        for trial in ranked[keep:]:
            trial.status = f"stopped@{trial.epochs_run}"
            del runs[trial.index]  # frees its prompts, head and optimiser state
        alive = ranked[:keep]
        for trial in plan.trials:
            if trial.status == "queued":
                trial.status = "not run (budget)"
        write_trials_csv(plan.trials, prepared.run_dir / "sweep.csv")
        reporter.trials_changed(plan.trials)
        if time.perf_counter() >= deadline:
            reporter.log(f"budget of {plan.budget_text} used up after rung {rung_index + 1}/{len(plan.rungs)}")
            break
    for trial in alive:
        if trial.status == "running":
            trial.status = f"stopped@{trial.epochs_run}" if trial.epochs_run < plan.rungs[-1] else "done"
    if not alive:
        raise UsageError(f"the budget ({plan.budget_text}) ended before any trial finished an epoch")
    best = max(alive, key=lambda t: (runs[t.index].best_key, -t.index))
    best.status += " (best)"
    csv_path = prepared.run_dir / "sweep.csv"
    write_trials_csv(plan.trials, csv_path)
    reporter.trials_changed(plan.trials)
    winner = runs[best.index]
    result = winner.finish(stopped_early=winner.epoch < config.train.epochs, probe_loader=prepared.probe_loader)
    saved = save_trained(prepared, winner.model, prepared.resolve(trial_config(config, best)), result, started,
                             extra_provenance={"sweep": {"trials": len(plan.trials), "rungs": plan.rungs,
                                                         "eta": plan.eta, "budget": plan.budget_text,
                                                         "csv": str(csv_path)}})
    return SweepResult(plan, best, saved, csv_path, time.perf_counter() - started)
