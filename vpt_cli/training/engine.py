"""The training loop: optimiser, schedule, AMP, best/last selection, early stopping, resume.

What it calls lives beside it, one concern each: `runtime` (device, AMP, seed), `probe` (the
linear-probe head), `checkpoint` (resumable state) and `reporting` (progress). Nothing here
prints.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from vpt_cli.config.run import FULL_FINETUNE_LR, MIN_VAL_PER_CLASS_TO_SELECT, TOKEN_INIT_IMAGES, TrainConfig
from vpt_cli.core.errors import TrainingInterrupted
from vpt_cli.evaluation.metrics import EvalReport
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.objectives import Objective
from vpt_cli.objectives.single_label import SingleLabel
from vpt_cli.runtime import distributed
from vpt_cli.runtime.context import RunContext
from vpt_cli.runtime.device import amp_dtype, autocast, rng_state, set_rng_state
from vpt_cli.runtime.reporting import EpochStats
from vpt_cli.training.probe import probe_init_head
from vpt_cli.training.resume import Checkpoint, check_same_settings


@dataclass
class FitResult:
    history: list[EpochStats]
    best_epoch: int
    best_report: EvalReport | None
    stopped_early: bool
    train_images_per_sec: float
    probe_val_acc: float | None = None
    selection: str = "best"  # which epoch was kept: "best" on val or "last"
    head_refit: bool = False  # the kept epoch's head was fitted once more as a probe (--refit-head)
    objective: Objective = field(default_factory=SingleLabel)  # as the task answers: thresholds tuned on val


def build_optimizer(model: PromptedViT, config: TrainConfig) -> torch.optim.Optimizer:
    """One optimiser group per role the model declares (`PromptedViT.parameter_groups`).

    AdamW (default): prompts at `lr` without weight decay, head at `head_lr` with it. SGD (the
    paper): momentum 0.9, decay on everything but the head bias. Head biases never decay. A full
    fine-tune trains the backbone at `lr` if given, else FULL_FINETUNE_LR: pretrained weights
    need a far smaller step than a freshly initialised head. Frozen weights get no group, so
    no gradient or optimiser state is ever allocated for them.
    """
    adamw = config.optimizer == "adamw"
    recipe = {  # role -> (lr, weight decay)
        "prompts": (config.resolved_lr(), 0.0 if adamw else config.weight_decay),
        "head": (config.resolved_head_lr(), config.weight_decay),
        "head_bias": (config.resolved_head_lr(), 0.0),
        "backbone": (config.lr if config.lr is not None else FULL_FINETUNE_LR, config.weight_decay),
    }
    groups = [{"params": params, "lr": recipe[role][0], "weight_decay": recipe[role][1], "name": role}
              for role, params in model.parameter_groups().items() if params]
    if adamw:
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=0.9)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    """Multiplier of the base lr at a step: linear warmup, then cosine decay to 0 (the paper's)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def sample_images(dataset: Any, count: int) -> torch.Tensor:
    """Up to `count` readable images of `dataset`, drawn at random (torch's seeded generator)."""
    images = []
    for index in torch.randperm(len(dataset)).tolist():
        item = dataset[index]
        if item is not None:
            images.append(item[0])
        if len(images) == count:
            break
    return torch.stack(images)


# Called with (dataset indices, logits, labels) of every evaluated batch, on the CPU.
BatchObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, classes: list[str], context: RunContext, description: str = "eval",
             on_batch: BatchObserver | None = None, objective: Objective = SingleLabel()) -> EvalReport:
    """Metrics of `model` over `loader` under `objective` (streamed: single-label logits are not
    all kept in memory; `on_batch` sees each batch's outputs when a caller wants per-image answers)."""
    device, amp, reporter = context.device, context.amp, context.reporter
    model.eval()
    accumulator = objective.accumulator(len(classes))
    reporter.start(description, len(loader.dataset) if hasattr(loader, "dataset") else None)
    for batch in loader:
        if batch is None:
            continue
        images, labels, indices = batch
        with autocast(device, amp):
            logits = model(images.to(device)).float()
        labels = labels.to(device)
        accumulator.update(logits.cpu(), labels.cpu(), objective.eval_loss_sum(logits, labels))
        if on_batch is not None:
            on_batch(indices, logits.cpu(), labels.cpu())
        reporter.advance(len(labels))
    reporter.finish()
    if distributed.world_size() > 1:
        accumulator.sum_across(distributed.sum_across)
    return accumulator.report(classes)


def evaluate_tuned(model: nn.Module, loader: Iterable, classes: list[str], context: RunContext, objective: Objective,
                   description: str = "val") -> tuple[Objective, EvalReport]:
    """(`objective` tuned on this split's logits, its report there): multi-label thresholds are
    fitted to val after training; other objectives come back as they are, with `evaluate`'s report."""
    if not objective.tunes_on_val:
        return objective, evaluate(model, loader, classes, context, description, objective=objective)
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    report = evaluate(model, loader, classes, context, description, on_batch=lambda *batch: kept.append(batch),
                      objective=objective)
    indices, logits, targets = (torch.cat(parts) for parts in zip(*kept)) if kept else (torch.empty(0),) * 3
    logits, targets = distributed.gather_rows(indices.long(), logits, targets)
    tuned = objective.tuned(logits, targets)
    return tuned, tuned.report(logits, targets, classes, loss=report.loss)


def train_one_epoch(model: PromptedViT, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    context: RunContext, description: str,
                    objective: Objective = SingleLabel()) -> tuple[float, float, float]:
    """One pass over `loader` under the run's objective; returns (mean loss, accuracy, images
    per second), over all processes when `model` is data-parallel (each then steps on its share
    of every global batch)."""
    device, amp, reporter = context.device, context.amp, context.reporter
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    reporter.start(description, len(loader.dataset) if hasattr(loader, "dataset") else None)
    for batch in loader:
        if batch is None and distributed.world_size() > 1:  # every process takes part in every step
            batch = empty_batch(model, objective.multi_label)
        if batch is None:
            continue
        images, labels, _ = batch
        images, labels = images.to(device), labels.to(device)
        with autocast(device, amp):
            logits = model(images)
            summed = objective.loss(logits.float(), labels, reduction="sum")
        loss = summed / distributed.step_divisor(objective.batch_weight(labels))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += summed.item()
        correct += objective.correct(logits, labels)
        seen += len(labels)
        reporter.advance(len(labels))
    reporter.finish()
    elapsed = time.perf_counter() - started
    loss_sum, correct, seen = distributed.sum_values(loss_sum, correct, seen)
    return loss_sum / max(seen, 1), correct / max(seen, 1), seen / max(elapsed, 1e-9)


def empty_batch(model: nn.Module, multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """No images, for a process whose whole share of a step failed to decode: it still steps
    (adding nothing), as DDP needs every process in every gradient all-reduce. Multi-label
    targets are (0, classes) rows."""
    inner = getattr(model, "module", model)
    labels = (torch.zeros(0, inner.head.out_features, dtype=torch.long) if multi_label
              else torch.zeros(0, dtype=torch.long))
    return torch.zeros(0, 3, *inner.backbone.patch_embed.img_size), labels, torch.zeros(0, dtype=torch.long)


# A last epoch this far below the probe start on val is more than small-split noise: say so.
LAST_EPOCH_WARNING_GAP = 0.1


class TrainingRun:
    """One training run that advances an epoch at a time, keeping its best-on-val weights.

    `fit` drives one run to the end; a sweep (vpt_cli.training.sweep) interleaves many runs and stops the
    hopeless ones between epochs. The best key is the objective's (val top-1, or mAP for
    multi-label tasks, then -val loss); the starting point (the probe-initialised head) is a candidate too, so a run never ends below the probe on val.
    With `select` "last" (or "auto" and fewer than MIN_VAL_PER_CLASS_TO_SELECT val images per
    class) every epoch replaces the kept weights and nothing stops early: on such a val split the
    pick is noise, and it kept the untrained start on few-shot folders (README, "Defaults"); a
    warning says when the last epoch ends far below the start.
    """

    def __init__(self, model: PromptedViT, train_loader: Any, val_loader: Any | None, classes: list[str],
                 config: TrainConfig, context: RunContext, settings: dict[str, Any] | None = None,
                 objective: Objective = SingleLabel()):
        device, reporter = context.device, context.reporter
        self.context = context
        self.model, self.train_loader, self.val_loader = model.to(device), train_loader, val_loader
        self.objective = objective
        self.classes, self.config, self.device, self.reporter = classes, config, device, reporter
        self.optimizer = build_optimizer(model, config)
        steps_per_epoch = max(1, len(train_loader))
        schedule = warmup_cosine(config.epochs * steps_per_epoch, config.resolved_warmup() * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(device.type, enabled=context.amp and amp_dtype(device) == torch.float16)
        self.history: list[EpochStats] = []
        self.settings = settings or {}
        self.state: dict[str, Any] = {"epoch": 0, "best_epoch": 0, "best_key": None, "since_best": 0,
                                      "history": [], "probe_val_acc": None}
        self.best_state = self._snapshot()
        self.trainer: nn.Module | None = None  # the model as it steps: DDP-wrapped under torchrun
        tiny_val = val_loader is None or len(val_loader.dataset) < MIN_VAL_PER_CLASS_TO_SELECT * len(classes)
        self.select_last = config.select == "last" or (config.select == "auto" and tiny_val)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.task_state_dict().items()}

    def start(self, probe_loader: Any | None, start_from: tuple[dict[str, torch.Tensor], float | None] | None = None) -> None:
        """Initialise prompts and head from `probe_loader` (token init, probe fit) or from a shared
        `start_from` = (weights, probe acc), and score the starting point on val."""
        if start_from is not None:
            self.model.load_task_state_dict(start_from[0])
            self.state["probe_val_acc"] = start_from[1]
        else:
            if self.model.prompt_init == "tokens":
                images = sample_images(probe_loader.dataset, TOKEN_INIT_IMAGES).to(self.device)
                self.model.init_prompts_from_tokens(images)
            if self.config.head_init == "probe":
                self.state["probe_val_acc"] = probe_init_head(self.model, probe_loader, self.val_loader, self.context,
                                                              self.objective)
        distributed.share_trained(self.model.task_state_dict())
        self.best_state = self._snapshot()
        start = self._score_val()
        if start is not None:
            self.state["best_key"] = list(self.objective.selection_key(start))

    def _score_val(self) -> EvalReport | None:
        """The model's val report under the run's objective (None without a val split)."""
        if not self.val_loader:
            return None
        return evaluate(self.model, self.val_loader, self.classes, self.context, "val", objective=self.objective)

    def resume(self, checkpoint: Checkpoint) -> None:
        """Continue from `checkpoint` exactly where its epoch ended; it must have the same settings."""
        check_same_settings(checkpoint.settings(), self.settings)
        self.best_state, self.state, rng = checkpoint.load(model=self.model, optimizer=self.optimizer,
                                                           scheduler=self.scheduler)
        self.history = [EpochStats(**h) for h in self.state["history"]]
        set_rng_state(distributed.own_rng(rng))
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None and "loader" in rng:
            generator.set_state(rng["loader"])
        self.reporter.log(f"resuming after epoch {self.state['epoch']}")

    @property
    def epoch(self) -> int:
        return self.state["epoch"]

    @property
    def best_key(self) -> tuple[float, float] | None:
        return tuple(self.state["best_key"]) if self.state["best_key"] is not None else None

    @property
    def should_stop(self) -> bool:
        """All epochs done, or no val improvement for `patience` epochs."""
        patience = self.config.patience
        return self.epoch >= self.config.epochs or bool(
            patience and self.val_loader and not self.select_last and self.state["since_best"] >= patience)

    def run_epoch(self) -> EpochStats:
        """Train one epoch, score it on val and keep it if it is the best so far."""
        epoch, config = self.epoch + 1, self.config
        started = time.perf_counter()
        self.trainer = self.trainer or distributed.wrap(self.model, self.device)
        loss, acc, speed = train_one_epoch(self.trainer, self.train_loader, self.optimizer, self.scheduler,
                                           self.scaler, self.context, f"epoch {epoch}/{config.epochs}", self.objective)
        report = self._score_val()
        key = self.objective.selection_key(report) if report else (float(epoch), 0.0)
        is_best = self.select_last or self.best_key is None or key > self.best_key
        if is_best:
            self.state.update(best_key=list(key), best_epoch=epoch, since_best=0)
            self.best_state = self._snapshot()
        else:
            self.state["since_best"] += 1
        stats = EpochStats(epoch, config.epochs, loss, acc, report.score if report else None,
                           report.loss if report else None, self.optimizer.param_groups[0]["lr"], speed,
                           time.perf_counter() - started, is_best, report.second_score if report else None)
        self.history.append(stats)
        self.state.update(epoch=epoch, history=[asdict(h) for h in self.history])
        self.reporter.epoch_end(stats)
        return stats

    def save(self, checkpoint: Checkpoint) -> None:
        """Checkpoint the end of the current epoch, with every generator the next one draws from
        (each process's own; rank 0 writes the file)."""
        rng = distributed.gather_rng(rng_state())
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:
            rng["loader"] = generator.get_state()
        if distributed.is_main():
            checkpoint.save(model=self.model, best_state=self.best_state, optimizer=self.optimizer,
                            scheduler=self.scheduler, state=self.state, settings=self.settings, rng=rng)

    @property
    def refits_head(self) -> bool:
        """Whether `finish` fits the head once more on the kept epoch's features (--refit-head)."""
        choice = self.config.refit_head
        return choice == "always" or (choice == "auto" and self.objective.refits_head_by_default)

    def finish(self, stopped_early: bool, probe_loader: Any) -> FitResult:
        """Load the best weights into the model, refit its head on `probe_loader` when the run
        asks for it, tune what the objective tunes on val (multi-label thresholds) and score the
        result there once more.

        The refit is classifier re-training (Kang et al. 2020, "Decoupling representation and
        classifier"): prompts trained with the head under long tail make better features than
        they make a head, because the head keeps more of the training frequencies than the
        balanced loss undoes (README, "Long tail"); the probe refitted under the same balance on
        the final features does not. It depends only on the kept weights and the data, so a
        resumed run refits the same head."""
        self.model.load_task_state_dict(self.best_state)
        refit = self.refits_head
        if refit:
            self.reporter.log("refitting the head on the final features (--refit-head)")
            probe_init_head(self.model, probe_loader, self.val_loader, self.context, self.objective)
        objective, best_report = self.objective, None
        if self.val_loader:
            objective, best_report = evaluate_tuned(self.model, self.val_loader, self.classes, self.context,
                                                    self.objective)
        start = self.state["probe_val_acc"]
        if self.select_last and best_report and start is not None and best_report.score < start - LAST_EPOCH_WARNING_GAP:
            self.reporter.log(f"warning: the last epoch scores {best_report.score:.3f} val {best_report.score_name}, "
                              f"below the linear-probe start's {start:.3f}; retry with a lower --lr, or --select best "
                              "to keep the start")
        speeds = [h.images_per_sec for h in self.history]
        return FitResult(self.history, self.state["best_epoch"], best_report, stopped_early,
                         sum(speeds) / len(speeds) if speeds else 0.0, self.state["probe_val_acc"],
                         selection="last" if self.select_last else "best", objective=objective, head_refit=refit)


def fit(model: PromptedViT, train_loader: Any, val_loader: Any | None, probe_loader: Any, classes: list[str],
        config: TrainConfig, context: RunContext, checkpoint: Checkpoint, resume: bool = False, settings: dict[str, Any] | None = None, objective: Objective = SingleLabel(),
        on_epoch: Callable[["TrainingRun"], None] | None = None) -> FitResult:
    """Train with best-on-val selection, early stopping and a checkpoint after every epoch.

    Ctrl-C (or SIGTERM) raises TrainingInterrupted; the checkpoint of the last finished epoch is
    what `resume=True` continues from, and a resumed run equals the uninterrupted one. The
    checkpoint must come from the same `settings`. `on_epoch(run)` follows every saved epoch (the
    run folder's best/last task files and results).
    """
    reporter = context.reporter
    run = TrainingRun(model, train_loader, val_loader, classes, config, context, settings, objective)
    interrupt_code: int | None = None
    try:
        if resume:
            run.resume(checkpoint)
        else:
            run.start(probe_loader)
        while not run.should_stop:
            run.run_epoch()
            run.save(checkpoint)
            if on_epoch is not None:
                on_epoch(run)
    except KeyboardInterrupt as exc:
        reporter.finish()  # take down the half-drawn progress bar before the error line
        interrupt_code = getattr(exc, "exit_code", TrainingInterrupted.exit_code)
    if interrupt_code is not None:
        # Raised here, not in the except block, so the error does not chain to the interrupt: its
        # frames hold the interrupted epoch's loader iterator, whose worker processes then shut
        # down now instead of at a later garbage collection (measured: a 10 s stall there).
        if run.epoch == 0:
            raise TrainingInterrupted("interrupted before the first epoch finished: nothing to resume; "
                                      "run the same command again", exit_code=interrupt_code)
        raise TrainingInterrupted(f"interrupted in epoch {run.epoch + 1}; epoch {run.epoch} is saved in "
                                  f"{checkpoint.path}, continue with --resume", exit_code=interrupt_code)
    stopped_early = run.epoch < config.epochs
    if stopped_early:
        reporter.log(f"early stop: no val improvement for {config.patience} epochs")
    return run.finish(stopped_early, probe_loader)
