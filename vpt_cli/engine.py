"""Training and evaluation loops: optimiser, schedule, AMP, probe-initialised head, resume.

Nothing here prints. Progress goes to a `Reporter` (the CLI renders it with rich; the library
default ignores it), so `--json` and `--quiet` stay clean.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vpt_cli.fileio import atomic_write
from vpt_cli.config import MIN_VAL_PER_CLASS_TO_SELECT, TOKEN_INIT_IMAGES, TrainConfig
from vpt_cli.errors import TaskError, TrainingInterrupted, UsageError
from vpt_cli.metrics import EvalReport, MetricAccumulator
from vpt_cli.prompts import PromptedViT

PROBE_WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4)  # strongest first: ties keep the smaller head
FULL_FINETUNE_LR = 2e-5


class Reporter:
    """Progress sink. Subclass and override what you want to show; every method is optional."""

    def start(self, description: str, total: int | None) -> None:
        """A unit of work with `total` steps begins (an epoch, an evaluation pass)."""

    def advance(self, steps: int = 1) -> None:
        """`steps` more steps of the current unit are done."""

    def finish(self) -> None:
        """The current unit is done."""

    def epoch_end(self, stats: "EpochStats") -> None:
        """One training epoch finished (stats include validation)."""

    def log(self, message: str) -> None:
        """A line worth keeping in the run log (not shown with --quiet)."""


@dataclass
class EpochStats:
    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_acc: float | None
    val_loss: float | None
    lr: float
    images_per_sec: float
    seconds: float
    is_best: bool = False


@dataclass
class FitResult:
    history: list[EpochStats]
    best_epoch: int
    best_report: EvalReport | None
    stopped_early: bool
    train_images_per_sec: float
    probe_val_acc: float | None = None
    selection: str = "best"  # which epoch was kept: "best" on val or "last"
    extra: dict[str, Any] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    """'auto' prefers CUDA, then Apple MPS, then CPU; an unavailable explicit choice is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available.get(name, False):
        raise UsageError(f"--device {name} is not available on this machine (try --device auto)")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device supports it, fp16 on older GPUs; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: PromptedViT, config: TrainConfig) -> torch.optim.Optimizer:
    """Parameter groups with their own lr / weight decay.

    AdamW (default): prompts at `lr` without weight decay, head at `head_lr` with it. SGD (the
    paper): momentum 0.9, decay on everything but the head bias. Head biases never decay. A full
    fine-tune trains the backbone at `lr` if given, else FULL_FINETUNE_LR: pretrained weights
    need a far smaller step than a freshly initialised head. Frozen weights get no group, so
    no gradient or optimiser state is ever allocated for them.
    """
    adamw = config.optimizer == "adamw"
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            lr, decay = config.lr if config.lr is not None else FULL_FINETUNE_LR, config.weight_decay
        elif name.startswith("head."):
            lr, decay = config.resolved_head_lr(), 0.0 if name.endswith("bias") else config.weight_decay
        else:
            lr, decay = config.resolved_lr(), 0.0 if adamw else config.weight_decay
        groups.append({"params": [param], "lr": lr, "weight_decay": decay, "name": name})
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


@torch.no_grad()  # not inference_mode: the probe fit needs autograd on these features
def extract_features(model: PromptedViT, loader: Iterable, device: torch.device, amp: bool,
                     reporter: Reporter) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of the (prompted) backbone and labels for every batch, in fp32 on CPU."""
    model.eval()
    features, labels = [], []
    reporter.start("features", len(loader))
    for batch in loader:
        if batch is None:
            continue
        images, targets, _ = batch
        with autocast(device, amp):
            features.append(model.forward_features(images.to(device)).float().cpu())
        labels.append(targets)
        reporter.advance(len(targets))
    reporter.finish()
    if not features:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    weight_decay: float, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L2-regularised, L-BFGS): the linear probe's solution."""
    weight = torch.zeros(num_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


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


def probe_init_head(model: PromptedViT, train_loader: Iterable, val_loader: Iterable | None,
                    device: torch.device, amp: bool, reporter: Reporter) -> float | None:
    """Set the head to the best linear probe on the model's initial features (LP-then-tune).

    The probe's L2 strength is picked on the val split when there is one. Training then starts
    at the probe's accuracy instead of chance, which is what lets prompts beat the probe on
    small folders (see README, "Defaults"). Returns the probe's val accuracy.
    """
    train_x, train_y = extract_features(model, train_loader, device, amp, reporter)
    val_x, val_y = extract_features(model, val_loader, device, amp, reporter) if val_loader else (None, None)
    num_classes = model.head.out_features
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    # Ties go to the smaller (more regularised) head, whose logits leave the prompts room to learn.
    for decay in PROBE_WEIGHT_DECAYS if val_x is not None and len(val_x) else (1e-3,):
        weight, bias = fit_linear_head(train_x, train_y, num_classes, decay)
        score = (
            ((val_x @ weight.T + bias).argmax(1) == val_y).float().mean().item()
            if val_x is not None and len(val_x) else 0.0
        )
        if best is None or score > best[0]:
            best = (score, weight, bias)
    assert best is not None
    with torch.no_grad():
        model.head.weight.copy_(best[1])
        model.head.bias.copy_(best[2])
    reporter.log(f"linear probe head: val acc {best[0]:.4f}")
    return best[0] if val_x is not None and len(val_x) else None


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, classes: list[str], device: torch.device, amp: bool,
             reporter: Reporter, description: str = "eval") -> EvalReport:
    """Metrics of `model` over `loader` (streamed: logits are not all kept in memory)."""
    model.eval()
    accumulator = MetricAccumulator(len(classes))
    reporter.start(description, len(loader.dataset) if hasattr(loader, "dataset") else None)
    for batch in loader:
        if batch is None:
            continue
        images, labels, _ = batch
        with autocast(device, amp):
            logits = model(images.to(device)).float()
        labels = labels.to(device)
        accumulator.update(logits.cpu(), labels.cpu(), F.cross_entropy(logits, labels, reduction="sum").item())
        reporter.advance(len(labels))
    reporter.finish()
    return accumulator.report(classes)


def train_one_epoch(model: PromptedViT, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, amp: bool,
                    scaler: torch.amp.GradScaler, reporter: Reporter, description: str) -> tuple[float, float, float]:
    """One pass over `loader`; returns (mean loss, accuracy, images per second)."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    reporter.start(description, len(loader.dataset) if hasattr(loader, "dataset") else None)
    for batch in loader:
        if batch is None:
            continue
        images, labels, _ = batch
        images, labels = images.to(device), labels.to(device)
        with autocast(device, amp):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        reporter.advance(len(labels))
    reporter.finish()
    elapsed = time.perf_counter() - started
    return loss_sum / max(seen, 1), correct / max(seen, 1), seen / max(elapsed, 1e-9)


class Checkpoint:
    """The resumable state of a run in one safetensors file (no pickle): weights, best weights,
    optimiser tensors, and the loop's bookkeeping as JSON metadata."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, model: PromptedViT, best_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> None:
        tensors = {f"model.{k}": v for k, v in model.task_state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
        optim = optimizer.state_dict()
        for index, param_state in optim["state"].items():
            for key, value in param_state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        metadata = {"state": json.dumps(state), "param_groups": json.dumps(optim["param_groups"])}
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        atomic_write(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def load(self, model: PromptedViT, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Restore weights and optimiser in place; return (best weights, loop state)."""
        from safetensors import safe_open

        if not self.path.is_file():
            raise TaskError(f"nothing to resume: no checkpoint at {self.path}")
        with safe_open(str(self.path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(self.path))
        model.load_task_state_dict(_strip(tensors, "model."))
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in _strip(tensors, "optim.").items():
            index, name = key.split(".", 1)
            optim_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(metadata["param_groups"])})
        return _strip(tensors, "best."), json.loads(metadata["state"])


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# A last epoch this far below the probe start on val is more than small-split noise: say so.
LAST_EPOCH_WARNING_GAP = 0.1


class TrainingRun:
    """One training run that advances an epoch at a time, keeping its best-on-val weights.

    `fit` drives one run to the end; a sweep (vpt_cli.sweep) interleaves many runs and stops the
    hopeless ones between epochs. The best key is (val top-1, -val loss); the starting point
    (the probe-initialised head) is a candidate too, so a run never ends below the probe on val.
    With `select` "last" (or "auto" and fewer than MIN_VAL_PER_CLASS_TO_SELECT val images per
    class) every epoch replaces the kept weights and nothing stops early: on such a val split the
    pick is noise, and it kept the untrained start on few-shot folders (README, "Defaults"); a
    warning says when the last epoch ends far below the start.
    """

    def __init__(self, model: PromptedViT, train_loader: Any, val_loader: Any | None, classes: list[str],
                 config: TrainConfig, device: torch.device, reporter: Reporter, run_fingerprint: str = ""):
        self.model, self.train_loader, self.val_loader = model.to(device), train_loader, val_loader
        self.classes, self.config, self.device, self.reporter = classes, config, device, reporter
        self.optimizer = build_optimizer(model, config)
        steps_per_epoch = max(1, len(train_loader))
        schedule = warmup_cosine(config.epochs * steps_per_epoch, config.resolved_warmup() * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp and amp_dtype(device) == torch.float16)
        self.history: list[EpochStats] = []
        self.state: dict[str, Any] = {"epoch": 0, "best_epoch": 0, "best_key": None, "since_best": 0,
                                      "history": [], "probe_val_acc": None, "run": run_fingerprint}
        self.best_state = self._snapshot()
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
                self.state["probe_val_acc"] = probe_init_head(self.model, probe_loader, self.val_loader, self.device,
                                                              self.config.amp, self.reporter)
        self.best_state = self._snapshot()
        if self.val_loader:
            start = evaluate(self.model, self.val_loader, self.classes, self.device, self.config.amp, self.reporter, "val")
            self.state["best_key"] = [start.top1, -(start.loss or 0.0)]

    def resume(self, checkpoint: Checkpoint) -> None:
        """Continue from `checkpoint`, which must come from the same run settings."""
        self.best_state, state = checkpoint.load(self.model, self.optimizer)
        if state.get("run") != self.state["run"]:
            raise TaskError("the checkpoint was made with other settings; rerun without --resume (and with --force)")
        self.state = state
        self.history = [EpochStats(**h) for h in state["history"]]
        self.scheduler.last_epoch = state["epoch"] * max(1, len(self.train_loader))
        self.reporter.log(f"resuming after epoch {state['epoch']}")

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
        loss, acc, speed = train_one_epoch(self.model, self.train_loader, self.optimizer, self.scheduler, self.device,
                                           config.amp, self.scaler, self.reporter, f"epoch {epoch}/{config.epochs}")
        report = (evaluate(self.model, self.val_loader, self.classes, self.device, config.amp, self.reporter, "val")
                  if self.val_loader else None)
        key = (report.top1, -(report.loss or 0.0)) if report else (float(epoch), 0.0)
        is_best = self.select_last or self.best_key is None or key > self.best_key
        if is_best:
            self.state.update(best_key=list(key), best_epoch=epoch, since_best=0)
            self.best_state = self._snapshot()
        else:
            self.state["since_best"] += 1
        stats = EpochStats(epoch, config.epochs, loss, acc, report.top1 if report else None,
                           report.loss if report else None, self.optimizer.param_groups[0]["lr"], speed,
                           time.perf_counter() - started, is_best)
        self.history.append(stats)
        self.state.update(epoch=epoch, history=[asdict(h) for h in self.history])
        self.reporter.epoch_end(stats)
        return stats

    def save(self, checkpoint: Checkpoint) -> None:
        checkpoint.save(self.model, self.best_state, self.optimizer, self.state)

    def finish(self, stopped_early: bool) -> FitResult:
        """Load the best weights into the model and score them on val once more."""
        self.model.load_task_state_dict(self.best_state)
        best_report = (evaluate(self.model, self.val_loader, self.classes, self.device, self.config.amp, self.reporter,
                                "val") if self.val_loader else None)
        start = self.state["probe_val_acc"]
        if self.select_last and best_report and start is not None and best_report.top1 < start - LAST_EPOCH_WARNING_GAP:
            self.reporter.log(f"warning: the last epoch scores {best_report.top1:.3f} on val, below the linear-probe "
                              f"start's {start:.3f}; retry with a lower --lr, or --select best to keep the start")
        speeds = [h.images_per_sec for h in self.history]
        return FitResult(self.history, self.state["best_epoch"], best_report, stopped_early,
                         sum(speeds) / len(speeds) if speeds else 0.0, self.state["probe_val_acc"],
                         "last" if self.select_last else "best")


def fit(model: PromptedViT, train_loader: Any, val_loader: Any | None, probe_loader: Any, classes: list[str],
        config: TrainConfig, device: torch.device, checkpoint: Checkpoint, reporter: Reporter,
        resume: bool = False, run_fingerprint: str = "") -> FitResult:
    """Train with best-on-val selection, early stopping and a checkpoint after every epoch.

    Ctrl-C saves the current state and raises TrainingInterrupted; `resume=True` continues from
    the checkpoint (which must come from the same run settings, `run_fingerprint`).
    """
    run = TrainingRun(model, train_loader, val_loader, classes, config, device, reporter, run_fingerprint)
    if resume:
        run.resume(checkpoint)
    else:
        run.start(probe_loader)
    while not run.should_stop:
        try:
            run.run_epoch()
        except KeyboardInterrupt:
            reporter.finish()  # take down the half-drawn progress bar before the error line
            run.save(checkpoint)
            raise TrainingInterrupted(
                f"interrupted in epoch {run.epoch + 1}; state saved to {checkpoint.path}, continue with --resume"
            ) from None
        run.save(checkpoint)
    stopped_early = run.epoch < config.epochs
    if stopped_early:
        reporter.log(f"early stop: no val improvement for {config.patience} epochs")
    return run.finish(stopped_early)
