"""What every training on a folder shares: the prepared run (data, loaders, backbone, run
folder) and the saving of a trained model as a task with its history.

`api.train` uses one prepared run per task; `sweep` shares one across all its trials (same data,
same frozen backbone), so the folder is scanned and the backbone loaded only once.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import timm
import torch

from vpt_cli import __version__
from vpt_cli.artifact import Task, TaskInfo, save_task
from vpt_cli.checkpoint import Checkpoint
from vpt_cli.backbones import Backbone, create_backbone
from vpt_cli.config import RunConfig
from vpt_cli.data import (DecodeCache, ImageDataset, Sample, build_transform, class_counts, decode_size,
                          discover_splits, few_shot, make_loader, validate_samples)
from vpt_cli.engine import FitResult, check_same_settings
from vpt_cli.errors import DataError, TaskError
from vpt_cli.home import remove_orphan_temp_files, resolve_task_path, runs_dir, slugify, task_lock, task_name_from
from vpt_cli.fileio import write_text
from vpt_cli.losses import ClassBalance
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
    test_report: EvalReport | None = None  # --trainval: the test split, never used for selection

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
            "test": self.test_report.to_dict() if self.test_report else None,
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
    test_loader: Any | None  # --trainval: the test split, scored once after training
    class_counts: list[int]  # training images per class, as trained (after --shots and unreadable files)
    shot_files: list[str] | None  # the files --shots kept, relative to DATA; None without --shots

    @property
    def balance(self) -> ClassBalance:
        train = self.config.train
        return ClassBalance(train.balance, tuple(self.class_counts), train.tau)


@dataclass
class ClaimedTask:
    """The task a run will write, locked for the run: where it goes and what it is called."""

    path: Path
    name: str
    run_dir: Path
    scratch: Path  # decoded photos for this run (vpt_cli.data.cache), removed when it ends

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.run_dir / "last.safetensors")


@contextmanager
def claim_task(config: RunConfig, task: str | None, force: bool, resume: bool = False) -> Iterator[ClaimedTask]:
    """Resolve the task name (default: the data folder's name, slugified), take its lock, and
    refuse what would lose work, all before any data or weights are read: an existing task
    without `force` (also on `resume`: a finished task is not resumed), or a checkpoint made with
    other settings. Temp files a killed writer left behind are removed under the lock."""
    config.validate()
    path = resolve_task_path(task if task is not None else slugify(Path(config.data.path).resolve().name))
    name = task_name_from(path)
    with task_lock(path), tempfile.TemporaryDirectory(prefix="vpt-decoded-") as scratch:
        claimed = ClaimedTask(path=path, name=name, run_dir=runs_dir(name), scratch=Path(scratch))
        if path.exists() and not force:
            hint = "it is finished, so there is nothing to resume; " if resume else ""
            raise TaskError(f"task '{name}' already exists at {path}; {hint}pass --force to train it again")
        if resume:
            check_same_settings(claimed.checkpoint.settings(), run_settings(config))
        remove_orphan_temp_files(path)
        for written in ("last.safetensors", "config.yaml", "skipped.txt", "history.json", "history.png"):
            remove_orphan_temp_files(claimed.run_dir / written)
        yield claimed


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint must be resumed with: the whole config as dotted keys, less the
    options that change where and how fast it runs, not what it computes."""
    flat = {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}
    return {key: value for key, value in flat.items() if key not in ("train.device", "data.workers")}


def prepare_run(config: RunConfig, task: ClaimedTask, reporter: Reporter) -> PreparedRun:
    """Scan and check the data, load the backbone and build the loaders for a claimed task."""
    data_root = Path(config.data.path)
    task_path, name = task.path, task.name
    seed_everything(config.train.seed)
    splits = discover_splits(data_root, config.data.val_split, config.train.seed, data_format=config.data.format,
                             trainval=config.data.trainval)
    if config.data.shots is not None:
        splits.train = few_shot(splits.train, config.data.shots, config.train.seed)
    backbone = create_backbone(config.backbone)  # first: its input size says how far large photos are drafted
    eval_size = decode_size(backbone.data_config)
    train_size = decode_size(backbone.data_config, train=True, augment=config.data.augment)
    train_samples, bad_train = validate_samples(splits.train, target=min(eval_size, train_size))
    val_samples, bad_val = validate_samples(splits.val, target=eval_size)
    skipped = [(str(p), r) for p, r in splits.skipped + bad_train + bad_val]
    if not train_samples:
        raise DataError(f"no readable training images in {data_root}")
    config.prompt.resolve_prompts(backbone.adapter.num_patches)  # the saved config records the count
    run_dir = task.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", config.to_yaml())
    write_skipped(run_dir, skipped)
    if skipped:
        reporter.log(f"skipped {len(skipped)} unreadable or non-image files (listed in {run_dir / 'skipped.txt'})")

    workers = config.data.workers
    batch = config.train.batch_size
    eval_transform = build_transform(backbone.data_config, train=False)
    eval_decode = DecodeCache(task.scratch, eval_size).load  # each photo decoded once per run, not once per epoch
    train_decode = DecodeCache(task.scratch, train_size).load
    # Fresh loader workers each epoch (not persistent): they are seeded from the loader's generator,
    # which the checkpoint saves, so a resumed run augments exactly as the uninterrupted one.
    train_loader = make_loader(ImageDataset(train_samples, build_transform(backbone.data_config, True, config.data.augment),
                                            train_decode),
                               batch, shuffle=True, workers=workers, seed=config.train.seed,
                               drop_last=len(train_samples) > batch, persistent=False,
                               class_balanced=config.train.balance == "resample")
    probe_loader = make_loader(ImageDataset(train_samples, eval_transform, eval_decode), batch, False, workers,
                               config.train.seed)
    held_out = (make_loader(ImageDataset(val_samples, eval_transform, eval_decode), batch, False, workers,
                            config.train.seed) if val_samples else None)
    # --trainval holds out the test split: nothing may be selected on it (probe strength, epoch), it is only scored.
    val_loader, test_loader = (None, held_out) if config.data.trainval else (held_out, None)
    num_val = 0 if config.data.trainval else len(val_samples)
    return PreparedRun(config, task_path, name, splits.classes, splits.source, len(train_samples), num_val,
                       skipped, run_dir, backbone, pick_device(config.train.device), train_loader, probe_loader, val_loader,
                       test_loader=test_loader,
                       class_counts=class_counts(train_samples, len(splits.classes)),
                       shot_files=_relative(train_samples, data_root) if config.data.shots is not None else None)


def _relative(samples: list[Sample], data_root: Path) -> list[str]:
    """Sample paths relative to DATA (to a list file's folder), so the record travels with the data."""
    base = data_root if data_root.is_dir() else data_root.parent
    return [os.path.relpath(sample.path, base) for sample in samples]


def save_trained(run: PreparedRun, model: PromptedViT, config: RunConfig, result: FitResult, started: float,
                 extra_provenance: dict[str, Any] | None = None, test_report: EvalReport | None = None) -> TrainResult:
    """Write the task file (its metadata says what it stores and how it was made) and the run's
    history; `config` is the trained model's own (a sweep's winner differs from `run.config`)."""
    report, history = result.best_report, result.history
    skipped = run.skipped + [item for item in failures_while_loading(run) if item not in run.skipped]
    info = TaskInfo(
        name=run.name, backbone=run.backbone.name, backbone_fingerprint=run.backbone.fingerprint,
        img_size=run.backbone.img_size, data_config=_jsonable(run.backbone.data_config), prompt=asdict(config.prompt),
        classes=run.classes, backbone_kwargs=config.backbone.kwargs, backbone_weights=run.backbone.weights,
        metrics={**_summary(report, "val"), **_summary(test_report, "test")},
        provenance={
            "data": str(Path(config.data.path).resolve()), "split": run.split_source, "num_train": run.num_train,
            "num_val": run.num_val, "skipped": len(skipped), "seed": config.train.seed,
            "class_counts": run.class_counts,
            **({"shots": {"k": config.data.shots, "files": run.shot_files}} if run.shot_files is not None else {}),
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
    write_skipped(run.run_dir, skipped)
    if history:
        render_history_png([asdict(h) for h in history], run.run_dir / "history.png")
    trainable = sum(p.numel() for group in model.parameter_groups().values() for p in group)
    return TrainResult(
        task_path=run.task_path, task_name=run.name, classes=run.classes, val_report=report, history=history,
        best_epoch=result.best_epoch, selection=result.selection, stopped_early=result.stopped_early,
        train_images_per_sec=result.train_images_per_sec, probe_val_acc=result.probe_val_acc,
        num_train=run.num_train, num_val=run.num_val, skipped=skipped, trainable_params=trainable,
        task_bytes=saved.size_bytes,
        backbone_bytes=sum(t.numel() * t.element_size() for t in run.backbone.model.state_dict().values()),
        run_dir=run.run_dir, seconds=time.perf_counter() - started, test_report=test_report,
    )


def write_skipped(run_dir: Path, skipped: list[tuple[str, str]]) -> None:
    write_text(run_dir / "skipped.txt", "".join(f"{file}\t{reason}\n" for file, reason in skipped))


def failures_while_loading(run: PreparedRun) -> list[tuple[str, str]]:
    """Images that passed the header check up front but failed to decode during training."""
    loaders = (run.train_loader, run.probe_loader, run.val_loader, run.test_loader)
    found = [(str(path), reason) for loader in loaders if loader is not None for path, reason in loader.dataset.failures]
    return list(dict.fromkeys(found))


def _summary(report: EvalReport | None, split: str) -> dict[str, Any]:
    if report is None:
        return {}
    return {f"{split}_top1": report.top1, f"{split}_top5": report.top5,
            f"{split}_balanced_accuracy": report.balanced_accuracy, f"{split}_macro_f1": report.macro_f1,
            f"{split}_samples": report.num_samples}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
