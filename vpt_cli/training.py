"""What every training on a folder shares: the prepared run (data, loaders, backbone, run
folder) and the saving of a trained model as a task with its history.

`api.train` uses one prepared run per task; `sweep` shares one across all its trials (same data,
same frozen backbone), so the folder is scanned and the backbone loaded only once.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch

from vpt_cli import __version__
from vpt_cli.artifact import Task, TaskInfo, resolve_task_path, runs_dir, save_task, task_name_from
from vpt_cli.backbones import Backbone, create_backbone
from vpt_cli.config import RunConfig
from vpt_cli.data import ImageDataset, build_transform, discover_splits, make_loader, validate_samples
from vpt_cli.engine import FitResult
from vpt_cli.errors import DataError, TaskError
from vpt_cli.fileio import write_text
from vpt_cli.metrics import EvalReport
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.plots import render_history_png
from vpt_cli.reporting import EpochStats, Reporter
from vpt_cli.runtime import pick_device, seed_everything


@dataclass
class TrainResult:
    task_path: Path
    task_name: str
    classes: list[str]
    val_report: EvalReport | None
    history: list[EpochStats]
    best_epoch: int  # the epoch kept as the task (0: the probe start), chosen by `selection`
    selection: str
    stopped_early: bool
    train_images_per_sec: float
    probe_val_acc: float | None
    num_train: int
    num_val: int
    skipped: list[tuple[str, str]]
    trainable_params: int
    task_bytes: int
    backbone_bytes: int
    run_dir: Path
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task_name, "task_path": str(self.task_path), "classes": self.classes,
            "val": self.val_report.to_dict() if self.val_report else None,
            "history": [asdict(h) for h in self.history], "best_epoch": self.best_epoch,
            "selection": self.selection, "stopped_early": self.stopped_early, "train_images_per_sec": self.train_images_per_sec,
            "probe_val_acc": self.probe_val_acc, "num_train": self.num_train, "num_val": self.num_val,
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
            "trainable_params": self.trainable_params, "task_bytes": self.task_bytes,
            "backbone_bytes": self.backbone_bytes, "run_dir": str(self.run_dir), "seconds": self.seconds,
        }


STORED_TENSORS = {"vpt-deep": "prompts + head", "vpt-shallow": "prompts + head", "linear": "head",
                  "full": "every backbone weight (fine-tuned) + head"}


@dataclass
class PreparedRun:
    """What any training on a folder needs, made once: checked data, loaders, backbone, run folder."""

    config: RunConfig
    task_path: Path
    name: str
    classes: list[str]
    split_source: str
    num_train: int
    num_val: int
    skipped: list[tuple[str, str]]
    run_dir: Path
    backbone: Backbone
    device: torch.device
    train_loader: Any
    probe_loader: Any
    val_loader: Any | None


def prepare_run(config: RunConfig, task: str | None, replace: bool, reporter: Reporter) -> PreparedRun:
    """Validate `config`, scan and check the data, load the backbone and build the loaders.

    Refuses an existing task unless `replace`, before any expensive work.
    """
    config.validate()
    data_root = Path(config.data.path)
    task_path = resolve_task_path(task or data_root.resolve().name)
    name = task_name_from(task_path)
    if task_path.exists() and not replace:
        raise TaskError(f"task '{name}' already exists at {task_path}; pass --force to overwrite it")
    seed_everything(config.train.seed)
    splits = discover_splits(data_root, config.data.val_split, config.train.seed)
    train_samples, bad_train = validate_samples(splits.train)
    val_samples, bad_val = validate_samples(splits.val)
    skipped = [(str(p), r) for p, r in splits.skipped + bad_train + bad_val]
    if not train_samples:
        raise DataError(f"no readable training images in {data_root}")
    backbone = create_backbone(config.backbone)
    config.prompt.resolve_prompts(backbone.adapter.num_patches)  # the saved config records the count
    config.prompt.resolve_pool(backbone.name)  # ... and the pooling
    run_dir = runs_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", config.to_yaml())
    write_text(run_dir / "skipped.txt", "".join(f"{f}\t{r}\n" for f, r in skipped))
    if skipped:
        reporter.log(f"skipped {len(skipped)} unreadable or non-image files (listed in {run_dir / 'skipped.txt'})")

    workers = config.data.workers
    batch = config.train.batch_size
    eval_transform = build_transform(backbone.data_config, train=False)
    train_loader = make_loader(ImageDataset(train_samples, build_transform(backbone.data_config, True, config.data.augment)),
                               batch, shuffle=True, workers=workers, seed=config.train.seed, drop_last=len(train_samples) > batch)
    probe_loader = make_loader(ImageDataset(train_samples, eval_transform), batch, False, workers, config.train.seed)
    val_loader = make_loader(ImageDataset(val_samples, eval_transform), batch, False, workers, config.train.seed) if val_samples else None
    return PreparedRun(config, task_path, name, splits.classes, splits.source, len(train_samples), len(val_samples),
                       skipped, run_dir, backbone, pick_device(config.train.device), train_loader, probe_loader, val_loader)


def save_trained(run: PreparedRun, model: PromptedViT, config: RunConfig, result: FitResult, started: float,
                 extra_provenance: dict[str, Any] | None = None) -> TrainResult:
    """Write the task file (its metadata says what it stores and how it was made) and the run's
    history; `config` is the trained model's own (a sweep's winner differs from `run.config`)."""
    report, history = result.best_report, result.history
    info = TaskInfo(
        name=run.name, backbone=run.backbone.name, backbone_fingerprint=run.backbone.fingerprint,
        img_size=run.backbone.img_size, data_config=_jsonable(run.backbone.data_config), prompt=asdict(config.prompt),
        classes=run.classes, backbone_kwargs=config.backbone.kwargs, backbone_weights=run.backbone.weights,
        metrics=_summary(report),
        provenance={
            "data": str(Path(config.data.path).resolve()), "split": run.split_source, "num_train": run.num_train,
            "num_val": run.num_val, "skipped": len(run.skipped), "seed": config.train.seed,
            "stores": STORED_TENSORS[config.prompt.method],
            "best_epoch": result.best_epoch, "selection": result.selection, "epochs_run": len(history), "config": config.to_dict(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"vpt_cli": __version__, "torch": torch.__version__, "timm": timm.__version__,
                         "python": platform.python_version()},
            **(extra_provenance or {}),
        },
    )
    saved = Task(info=info, tensors=model.task_state_dict())
    save_task(saved, run.task_path, force=True)  # prepare_run already refused an unwanted overwrite
    write_text(run.run_dir / "history.json", json.dumps([asdict(h) for h in history], indent=1))
    if history:
        render_history_png([asdict(h) for h in history], run.run_dir / "history.png")
    trainable = sum(p.numel() for group in model.parameter_groups().values() for p in group)
    return TrainResult(
        task_path=run.task_path, task_name=run.name, classes=run.classes, val_report=report, history=history,
        best_epoch=result.best_epoch, selection=result.selection, stopped_early=result.stopped_early,
        train_images_per_sec=result.train_images_per_sec, probe_val_acc=result.probe_val_acc,
        num_train=run.num_train, num_val=run.num_val, skipped=run.skipped, trainable_params=trainable,
        task_bytes=saved.size_bytes,
        backbone_bytes=sum(t.numel() * t.element_size() for t in run.backbone.model.state_dict().values()),
        run_dir=run.run_dir, seconds=time.perf_counter() - started,
    )


def _summary(report: EvalReport | None) -> dict[str, Any]:
    if report is None:
        return {}
    return {"val_top1": report.top1, "val_top5": report.top5, "val_balanced_accuracy": report.balanced_accuracy,
            "val_macro_f1": report.macro_f1, "val_samples": report.num_samples}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
