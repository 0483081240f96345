"""What every training on a folder shares: the prepared run (data, loaders, backbone, run
folder) and the saving of a trained model as a task with its history.

`api.train` uses one prepared run per task; `sweep` shares one across all its trials (same data,
same frozen backbone), so the folder is scanned and the backbone loaded only once.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import timm
import torch

from vpt_cli import __version__, distributed
from vpt_cli.artifact import Task, TaskInfo, save_task
from vpt_cli.checkpoint import Checkpoint
from vpt_cli.backbones import Backbone, check_weights_reachable, create_backbone
from vpt_cli.config import RunConfig, apply_overrides
from vpt_cli.data import (DecodeCache, ImageDataset, Sample, auto_workers, build_transform, class_counts, decode_size,
                          discover_splits, few_shot, make_loader, validate_samples)
from vpt_cli.engine import FitResult, TrainingRun, check_same_settings, describe_changes
from vpt_cli.errors import DataError, TaskError, UsageError
from vpt_cli.home import (check_task_name, remove_orphan_temp_files, resolve_task_path, slugify, task_lock,
                          task_name_from)
from vpt_cli.fileio import numbered_dir, write_text
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
        return Checkpoint(self.run_dir / CHECKPOINT_FILE, task=str(self.path.resolve()))


CHECKPOINT_FILE = "checkpoint.safetensors"  # resumable state; best/last.safetensors are usable tasks


@dataclass
class RunFolder:
    """Where a run's files go: `project/name`, numbered (name2, ...) unless `exist_ok`."""

    project: str | Path = "runs/train"
    name: str | None = None  # default: the task's name
    exist_ok: bool = False
    tensorboard: bool = False  # also log every epoch's scalars there for TensorBoard (tensorboardX)


@contextmanager
def claim_task(config: RunConfig, task: str | None, force: bool, resume: bool = False,
               folder: RunFolder | None = None) -> Iterator[ClaimedTask]:
    """Resolve the task name (default: the data folder's name, slugified), take its lock, and
    refuse what would lose work, all before any data or weights are read: an existing task
    without `force` (also on `resume`: a finished task is not resumed), or a checkpoint made with
    other settings. Then make the run folder: a new numbered one, or on `resume` (or `exist_ok`)
    the folder itself. Temp files a killed writer left behind are removed under the lock. Under
    torchrun rank 0 alone locks, checks and makes the folder; the others get its answer. Every
    process gets its own scratch folder for decoded photos, removed when the run ends."""
    config.validate()
    folder = folder or RunFolder()
    path = resolve_task_path(task if task is not None else default_task_name(config.data.path))
    name = task_name_from(path)
    run_name = check_task_name(folder.name) if folder.name is not None else name
    exact = (Path(folder.project) / run_name).resolve()

    def claim(held: ExitStack) -> Path:
        held.enter_context(task_lock(path))
        if path.exists() and not force:
            hint = "it is finished, so there is nothing to resume; " if resume else ""
            raise TaskError(f"task '{name}' already exists at {path}; {hint}pass --force to train it again")
        if resume:
            check_same_settings(Checkpoint(exact / CHECKPOINT_FILE).settings(), run_settings(config))
        remove_orphan_temp_files(path)
        try:
            run_dir = numbered_dir(exact.parent, run_name, exist_ok=resume or folder.exist_ok).resolve()
        except OSError as exc:
            raise UsageError(f"cannot make the run folder {exact}: {exc.strerror or exc}") from None
        for written in RUN_FILES:
            remove_orphan_temp_files(run_dir / written)
        return run_dir

    with ExitStack() as held:
        scratch = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="vpt-decoded-")))
        yield ClaimedTask(path=path, name=name, run_dir=distributed.from_main(lambda: claim(held)), scratch=scratch)


RUN_FILES = (CHECKPOINT_FILE, "best.safetensors", "last.safetensors", "args.yaml", "results.csv", "results.png",
             "skipped.txt", "sweep.csv")


# What a resumed run may change: where and how fast it runs, and how long (extending the epochs).
def default_task_name(data: str | Path) -> str:
    """The task name `train` uses when none is given: the data folder's name, made to fit."""
    return slugify(Path(data or ".").resolve().name)


RESUME_MAY_CHANGE = ("train.device", "data.workers", "train.epochs")
_PATH_SETTINGS = ("data.path", "backbone.weights")


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint must be resumed with: the whole config as given (before 'auto'
    values are resolved) as dotted keys with absolute paths, less RESUME_MAY_CHANGE."""
    return {f"{section}.{key}": run_settings_value(f"{section}.{key}", value)
            for section, values in config.to_dict().items() for key, value in values.items()
            if f"{section}.{key}" not in RESUME_MAY_CHANGE}


def settings_config(saved: dict[str, Any], given: dict[str, Any]) -> RunConfig:
    """The config a run resumes with: its checkpoint's settings, plus only what RESUME_MAY_CHANGE
    among the options the user `given` (dotted keys, None = not given); any other given option
    that differs is refused, in one line naming it."""
    asked = {key: run_settings_value(key, value) for key, value in given.items() if value is not None}
    changed = [key for key, value in asked.items() if key not in RESUME_MAY_CHANGE and value != saved.get(key)]
    if changed:
        raise UsageError(f"--resume continues with the run's own settings; these differ: "
                         f"{describe_changes(saved, asked, changed)} (only --epochs, --device and --workers may "
                         "change; start a new run with --force instead)")
    config = RunConfig()
    apply_overrides(config, {**saved, **{k: v for k, v in asked.items() if k in RESUME_MAY_CHANGE}})
    return config.validate()


def run_settings_value(key: str, value: Any) -> Any:
    """`value` as run_settings stores it (absolute paths)."""
    return str(Path(value).resolve()) if key in _PATH_SETTINGS and value else value


def prepare_run(config: RunConfig, task: ClaimedTask, reporter: Reporter) -> PreparedRun:
    """Scan and check the data, load the backbone and build the loaders for a claimed task."""
    data_root = Path(config.data.path)
    task_path, name = task.path, task.name
    check_weights_reachable(config.backbone)
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
    config.prompt.resolve_pool(backbone.name)  # ... and the pooling
    patch = backbone.adapter.patch_size
    if backbone.img_size % patch:
        reporter.log(f"warning: the image size {backbone.img_size} is not a multiple of the {patch} px patch size: "
                     f"the last {backbone.img_size % patch} pixel rows and columns are never seen")
    run_dir = task.run_dir
    if distributed.is_main():
        train_workers = config.data.workers if config.data.workers is not None else auto_workers(len(train_samples))
        write_text(run_dir / "args.yaml", resolved_args(config, backbone, train_workers).to_yaml())
        write_skipped(run_dir, skipped)
    if skipped:
        reporter.log(f"skipped {len(skipped)} unreadable or non-image files (listed in {run_dir / 'skipped.txt'})")

    workers = config.data.workers
    batch = config.train.batch_size
    if min(batch, len(train_samples)) < distributed.world_size():
        raise UsageError(f"{distributed.world_size()} processes need a global batch of at least as many training "
                         f"images (--batch-size {batch}, {len(train_samples)} training images)")
    if distributed.share_note(batch):
        reporter.log(distributed.share_note(batch))
    shard = distributed.shard()
    eval_transform = build_transform(backbone.data_config, train=False)
    eval_decode = DecodeCache(task.scratch, eval_size).load  # each photo decoded once per run, not once per epoch
    train_decode = DecodeCache(task.scratch, train_size).load
    # Fresh loader workers each epoch (not persistent): they are seeded from the loader's generator,
    # which the checkpoint saves, so a resumed run augments exactly as the uninterrupted one.
    train_loader = make_loader(ImageDataset(train_samples, build_transform(backbone.data_config, True, config.data.augment),
                                            train_decode),
                               batch, shuffle=True, workers=workers, seed=config.train.seed,
                               drop_last=len(train_samples) > batch, persistent=False,
                               class_balanced=config.train.balance == "resample", shard=shard)
    probe_loader = make_loader(ImageDataset(train_samples, eval_transform, eval_decode), batch, False, workers,
                               config.train.seed, shard=shard)
    held_out = (make_loader(ImageDataset(val_samples, eval_transform, eval_decode), batch, False, workers,
                            config.train.seed, shard=shard) if val_samples else None)
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


def task_info(run: PreparedRun, config: RunConfig, report: EvalReport | None, provenance: dict[str, Any],
              test_report: EvalReport | None = None) -> TaskInfo:
    """What a task file made from this run says about itself (`test_report`: --trainval's test
    split, scored once and never selected on)."""
    return TaskInfo(
        name=run.name, backbone=run.backbone.name, backbone_fingerprint=run.backbone.fingerprint,
        img_size=run.backbone.img_size, data_config=_jsonable(run.backbone.data_config), prompt=asdict(config.prompt),
        classes=run.classes, backbone_kwargs=config.backbone.kwargs, backbone_weights=run.backbone.weights,
        metrics={**_summary(report, "val"), **_summary(test_report, "test")},
        provenance={
            "data": str(Path(config.data.path).resolve()), "split": run.split_source, "num_train": run.num_train,
            "num_val": run.num_val, "seed": config.train.seed, "stores": STORED_TENSORS[config.prompt.method],
            "class_counts": run.class_counts,
            **({"shots": {"k": config.data.shots, "files": run.shot_files}} if run.shot_files is not None else {}),
            "config": config.to_dict(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"vpt_cli": __version__, "torch": torch.__version__, "timm": timm.__version__,
                         "python": platform.python_version()},
            **provenance,
        },
    )


class EpochWriter:
    """After every epoch: best.safetensors and last.safetensors (usable task files), results.csv
    and results.png in the run folder, so a run stopped at any point leaves something to use;
    with `tensorboard`, the epoch's scalars as TensorBoard events there too. Close it after the run
    (its event writer works in the background)."""

    def __init__(self, run: PreparedRun, config: RunConfig, tensorboard: bool = False):
        self.run, self.config = run, config
        self.events = tensorboard_writer(run.run_dir) if tensorboard else None

    def __call__(self, training: TrainingRun) -> None:
        run, config, history = self.run, self.config, training.history
        last_report = history[-1]
        save_task(Task(task_info(run, config, None, {"epoch": last_report.epoch, "kept": "last",
                                                      "val_top1": last_report.val_acc}),
                       training.model.task_state_dict()), run.run_dir / "last.safetensors", force=True)
        save_task(Task(task_info(run, config, None, {"epoch": training.state["best_epoch"], "kept": "best"}),
                       training.best_state), run.run_dir / "best.safetensors", force=True)
        write_results(run.run_dir, history, training.state["probe_val_acc"], training.state["best_epoch"])
        if self.events is not None:
            for tag, field in TENSORBOARD_SCALARS.items():
                value = getattr(last_report, field)
                if value is not None:
                    self.events.add_scalar(tag, value, last_report.epoch)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


TENSORBOARD_SCALARS = {"train/loss": "train_loss", "train/acc": "train_acc", "val/loss": "val_loss",
                       "val/acc": "val_acc", "val/balanced_acc": "val_balanced_acc", "lr": "lr",
                       "speed/images_per_sec": "images_per_sec"}


def tensorboard_writer(run_dir: Path) -> Any:
    """TensorBoard's event writer on `run_dir` (the small tensorboardX package, an optional
    dependency: pip install 'vpt-cli[tensorboard]')."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs tensorboardX: pip install 'vpt-cli[tensorboard]'") from None
    return SummaryWriter(logdir=str(run_dir))


def write_results(run_dir: Path, history: list[EpochStats], probe_acc: float | None, kept_epoch: int) -> None:
    """results.csv (one row per epoch) and results.png (curves, probe start, kept epoch)."""
    columns = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc",
               "images_per_sec", "seconds")
    lines = [",".join(columns)] + [",".join("" if getattr(h, c) is None else f"{getattr(h, c):.6g}" for c in columns)
                                   for h in history]
    write_text(run_dir / "results.csv", "\n".join(lines) + "\n")
    if history:
        render_history_png([asdict(h) for h in history], run_dir / "results.png", probe_acc=probe_acc,
                           kept_epoch=kept_epoch)


def resolved_args(config: RunConfig, backbone: Backbone, workers: int) -> RunConfig:
    """`config` with every value concrete (no null, no 'auto') and absolute paths: args.yaml,
    reusable with --config from any folder."""
    resolved = copy.deepcopy(config)
    resolved.data.path = str(Path(config.data.path).resolve())
    resolved.backbone.weights = backbone.weights
    resolved.backbone.img_size = backbone.img_size
    resolved.data.workers = workers
    resolved.prompt.dropout = config.prompt.resolved_dropout
    resolved.train.lr = config.train.resolved_lr()
    resolved.train.head_lr = config.train.resolved_head_lr()
    resolved.train.warmup_epochs = config.train.resolved_warmup()
    return resolved


def save_trained(run: PreparedRun, model: PromptedViT, config: RunConfig, result: FitResult, started: float,
                 extra_provenance: dict[str, Any] | None = None, test_report: EvalReport | None = None) -> TrainResult:
    """Write the task file (its metadata says what it stores and how it was made) and the run's
    results; `config` is the trained model's own (a sweep's winner differs from `run.config`)."""
    report, history = result.best_report, result.history
    skipped = run.skipped + [item for item in failures_while_loading(run) if item not in run.skipped]
    info = task_info(run, config, report, {"skipped": len(skipped), "best_epoch": result.best_epoch,
                                           "selection": result.selection, "epochs_run": len(history),
                                           "run_dir": str(run.run_dir), **(extra_provenance or {})},
                     test_report=test_report)
    saved = Task(info=info, tensors=model.task_state_dict())
    if distributed.is_main():
        save_task(saved, run.task_path, force=True)  # claim_task already refused an unwanted overwrite
        write_skipped(run.run_dir, skipped)
        write_results(run.run_dir, history, result.probe_val_acc, result.best_epoch)
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
    """Images that passed the header check up front but failed to decode during training (in any
    process)."""
    loaders = (run.train_loader, run.probe_loader, run.val_loader, run.test_loader)
    found = distributed.gather_lists([(str(path), reason) for loader in loaders if loader is not None
                                      for path, reason in loader.dataset.failures])
    return list(dict.fromkeys(found))


def _summary(report: EvalReport | None, split: str) -> dict[str, Any]:
    if report is None:
        return {}
    return {f"{split}_top1": report.top1, f"{split}_top5": report.top5,
            f"{split}_balanced_accuracy": report.balanced_accuracy, f"{split}_macro_f1": report.macro_f1,
            f"{split}_samples": report.num_samples}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
