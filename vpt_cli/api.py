"""The library API: train, evaluate, predict and export tasks without the CLI.

Each function composes data, backbone, model, engine and artifact, and returns a result object
that the CLI renders (or that `--json` dumps). Nothing here prints; progress goes to a Reporter.
"""
from __future__ import annotations

import csv
import hashlib
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
from vpt_cli.artifact import (Task, TaskInfo, load_task, resolve_task_path, runs_dir,
                              save_task, task_name_from)
from vpt_cli.backbones import Backbone, create_backbone
from vpt_cli.config import BackboneConfig, PromptConfig, RunConfig
from vpt_cli.data import (ImageDataset, ImageLoadError, auto_workers, build_transform, discover_splits,
                          list_images, load_image, make_loader, scan_class_folders, validate_samples)
from vpt_cli.engine import (Checkpoint, EpochStats, FitResult, Reporter, evaluate as run_evaluation, fit,
                            pick_device, probe_init_head, seed_everything)
from vpt_cli.errors import DataError, PredictError, TaskError, UsageError
from vpt_cli.fileio import atomic_write
from vpt_cli.metrics import EvalReport, write_confusion_csv
from vpt_cli.plots import render_confusion_png, render_history_png
from vpt_cli.prompts import PromptedViT


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
    """What any training on a folder needs, made once: checked data, loaders, backbone, run folder.

    `train` uses one per run; a sweep shares one across all its trials (same data, same frozen
    backbone), so the folder is scanned and the backbone loaded only once.
    """

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
    config.prompt.resolve_prompts(backbone.model.patch_embed.num_patches)  # the saved config records the count
    run_dir = runs_dir(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(run_dir / "config.yaml", config.to_yaml())
    _write_text(run_dir / "skipped.txt", "".join(f"{f}\t{r}\n" for f, r in skipped))
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


def train(config: RunConfig, task: str | None = None, force: bool = False, resume: bool = False,
          reporter: Reporter | None = None) -> TrainResult:
    """Train a task on `config.data.path` and save it to the registry (or to a task file path)."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    run = prepare_run(config, task, force or resume, reporter)
    model = PromptedViT(run.backbone.model, len(run.classes), config.prompt)
    if config.prompt.method == "linear":
        model.to(run.device)
        probe_acc = probe_init_head(model, run.probe_loader, run.val_loader, run.device, config.train.amp, reporter)
        report = (run_evaluation(model, run.val_loader, run.classes, run.device, config.train.amp, reporter, "val")
                  if run.val_loader else None)
        result = FitResult([], 0, report, False, 0.0, probe_acc)
    else:
        run_key = hashlib.sha256(json.dumps({k: v for k, v in config.to_dict().items() if k != "train"} |
                                            {"epochs": config.train.epochs}, sort_keys=True).encode()).hexdigest()[:16]
        result = fit(model, run.train_loader, run.val_loader, run.probe_loader, run.classes, config.train, run.device,
                     Checkpoint(run.run_dir / "last.safetensors"), reporter, resume=resume, run_fingerprint=run_key)
    return save_trained(run, model, config, result, started)


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
    _write_text(run.run_dir / "history.json", json.dumps([asdict(h) for h in history], indent=1))
    if history:
        render_history_png([asdict(h) for h in history], run.run_dir / "history.png")
    trainable = sum(p.numel() for group in model.trainable_parameters().values() for p in group)
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


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass
class LoadedTask:
    """A task ready for inference: the model on its device, and what the task file says."""

    task: Task
    backbone: Backbone
    model: PromptedViT
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return self.task.info.classes


def load_for_inference(task: str | Path, backbone_weights: str | None = None, device: str = "auto") -> LoadedTask:
    """Load a task and rebuild its model on the backbone it was trained on.

    Backbone weights: `backbone_weights` if given, else the file used in training when it still
    exists, else timm's hub. A backbone whose fingerprint differs is refused.
    """
    loaded = load_task(resolve_task_path(task))
    info = loaded.info
    weights = backbone_weights or (info.backbone_weights if info.backbone_weights and Path(info.backbone_weights).is_file() else None)
    backbone = create_backbone(BackboneConfig(name=info.backbone, weights=weights, img_size=info.img_size,
                                              kwargs=info.backbone_kwargs))
    if backbone.fingerprint != info.backbone_fingerprint:
        raise TaskError(
            f"task '{info.name}' was trained on other '{info.backbone}' weights (fingerprint "
            f"{info.backbone_fingerprint[:12]}, these are {backbone.fingerprint[:12]}); pass the original --backbone-weights"
        )
    model = PromptedViT(backbone.model, len(info.classes), PromptConfig(**info.prompt))
    try:
        model.load_task_state_dict(loaded.tensors)
    except ValueError as exc:
        raise TaskError(f"task file {loaded.path} is inconsistent: {exc}") from None
    target = pick_device(device)
    return LoadedTask(task=loaded, backbone=backbone, model=model.to(target).eval(), device=target)


@dataclass
class EvalResult:
    task_name: str
    report: EvalReport
    unknown_classes: list[str]
    skipped: list[tuple[str, str]]
    confusion_csv: Path
    confusion_png: Path

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task_name, **self.report.to_dict(), "unknown_classes": self.unknown_classes,
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
                "confusion_csv": str(self.confusion_csv), "confusion_png": str(self.confusion_png)}


def evaluate(data: str | Path, task: str | Path, backbone_weights: str | None = None, batch_size: int = 64,
             device: str = "auto", workers: int | None = None, amp: bool = False, output_dir: str | Path | None = None,
             reporter: Reporter | None = None) -> EvalResult:
    """Metrics of a task on a folder of class folders; classes unknown to the task are reported."""
    reporter = reporter or Reporter()
    loaded = load_for_inference(task, backbone_weights, device)
    classes, samples, skipped_files, unknown = scan_class_folders(Path(data), loaded.classes)
    good, bad = validate_samples(samples)
    skipped = [(str(p), r) for p, r in skipped_files + bad]
    if not good:
        raise DataError(f"no readable images of the task's classes in {data}")
    loader = make_loader(ImageDataset(good, build_transform(loaded.backbone.data_config, train=False)),
                         batch_size, False, workers, 0)
    report = run_evaluation(loaded.model, loader, classes, loaded.device, amp, reporter)
    out = Path(output_dir) if output_dir else runs_dir(loaded.task.info.name) / "eval"
    csv_path, png_path = out / "confusion.csv", out / "confusion.png"
    write_confusion_csv(report, csv_path)
    render_confusion_png(report, png_path, title=f"{loaded.task.info.name} on {Path(data).name}")
    return EvalResult(loaded.task.info.name, report, unknown, skipped, csv_path, png_path)


@dataclass
class Prediction:
    file: str
    task: str
    top: list[tuple[str, float]]  # (class, probability), best first


@dataclass
class PredictResult:
    tasks: list[str]
    predictions: list[Prediction]  # by image, then in task order
    failures: list[tuple[str, str]]
    images_per_sec: float
    num_images: int

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.tasks[0] if len(self.tasks) == 1 else None, "tasks": self.tasks,
                "predictions": [{"file": p.file, "task": p.task, "top": [{"class": c, "prob": s} for c, s in p.top]}
                                for p in self.predictions],
                "failures": [{"file": f, "reason": r} for f, r in self.failures]}


class _PredictDataset(torch.utils.data.Dataset):
    """Decodes inputs in loader workers so decoding overlaps the forward pass."""

    def __init__(self, files: list[Path], transform: Any):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            return self.transform(load_image(self.files[index])), index, ""
        except ImageLoadError as exc:
            return None, index, exc.reason


def _collate_predict(batch: list) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    good = [(img, i) for img, i, _ in batch if img is not None]
    bad = [(i, reason) for img, i, reason in batch if img is None]
    images = torch.stack([img for img, _ in good]) if good else None
    return images, [i for _, i in good], bad


def predict(inputs: list[str], task: str | Path | list[str | Path], top_k: int = 5, backbone_weights: str | None = None,
            batch_size: int | None = None, device: str = "auto", workers: int | None = None, amp: bool = False,
            reporter: Reporter | None = None, tasks_from: str | Path | None = None) -> PredictResult:
    """Top-k classes of each task for image files, folders and globs; unreadable inputs are reported, not fatal.

    Several tasks share every batch: each image is paired with each of its tasks (all of `task`,
    or its rows of the `tasks_from` CSV) and all pairs take one backbone pass. `batch_size`
    counts pairs; None picks one for the device.
    """
    from vpt_cli.serving import load_tasks  # late: serving builds on load_for_inference above

    reporter = reporter or Reporter()
    names = [str(task)] if isinstance(task, (str, Path)) else [str(t) for t in task]
    if tasks_from is not None:
        if inputs or names:
            raise UsageError("give images with --task, or --tasks-from, not both")
        files, requested, failures = _read_tasks_csv(Path(tasks_from))
        names = list(dict.fromkeys(name for wanted in requested for name in wanted))
        if not files:
            raise PredictError(f"no readable rows in {tasks_from}" + (f" ({failures[0][1]})" if failures else ""))
    else:
        files, missing = list_images(inputs)
        failures = list(missing)
        if not files:
            raise PredictError(f"no images found in {', '.join(inputs)}" + (f" ({failures[0][1]})" if failures else ""))
        requested = [names] * len(files)
    server = load_tasks(names, backbone_weights, device)
    wanted = [[names.index(name) for name in row] for row in requested]
    pairs_per_image = sum(map(len, wanted)) / len(wanted)
    image_batch = max(1, round((batch_size or server.auto_batch_size()) / pairs_per_image))
    dataset = _PredictDataset(files, server.transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=image_batch, shuffle=False, collate_fn=_collate_predict,
                                         num_workers=auto_workers(len(files)) if workers is None else workers)
    predictions: list[Prediction] = []
    read = 0
    started = time.perf_counter()
    reporter.start("predict", len(files))
    for images, indices, bad in loader:
        failures.extend((str(files[i]), reason) for i, reason in bad)
        if images is not None:
            rows = torch.tensor([row for row, index in enumerate(indices) for _ in wanted[index]])
            task_index = torch.tensor([t for index in indices for t in wanted[index]])
            answers = server.top_k(server.logits(images[rows], task_index, amp), task_index, max(1, top_k))
            pairs = [(index, t) for index in indices for t in wanted[index]]
            predictions += [Prediction(str(files[index]), server.names[t], top) for (index, t), top in zip(pairs, answers)]
            read += len(indices)
        reporter.advance(len(indices) + len(bad))
    reporter.finish()
    elapsed = time.perf_counter() - started
    if not predictions:
        raise PredictError(f"none of the {len(files)} inputs could be read (first: {failures[0][0]}: {failures[0][1]})")
    return PredictResult(server.names, predictions, failures, read / max(elapsed, 1e-9), read)


def _read_tasks_csv(path: Path) -> tuple[list[Path], list[list[str]], list[tuple[str, str]]]:
    """`image,task` rows (header required; ';' separates several tasks in one cell) -> (files, tasks per file, failures).

    Relative image paths are relative to the CSV's folder, so the file can travel with its images.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read --tasks-from {path}: {exc}") from None
    if not rows or not {"image", "task"} <= set(rows[0]):
        raise UsageError(f"--tasks-from {path} needs a header with 'image' and 'task' columns")
    by_file: dict[Path, list[str]] = {}
    failures: list[tuple[str, str]] = []
    for line, row in enumerate(rows, 2):
        image, cell = (row.get("image") or "").strip(), (row.get("task") or "").strip()
        tasks = [name.strip() for name in cell.split(";") if name.strip()]
        if not image or not tasks:
            raise UsageError(f"--tasks-from {path}, line {line}: needs an image and a task")
        file = path.parent / Path(image).expanduser()
        if not file.is_file():
            failures.append((image, "no such file"))
            continue
        wanted = by_file.setdefault(file, [])
        wanted += [name for name in tasks if name not in wanted]
    return list(by_file), list(by_file.values()), failures


def export(tasks: str | Path | list[str | Path], fmt: str, output: str | Path,
           backbone_weights: str | None = None) -> Any:
    """Write one task (backbone + prompts + head) or a multi-task bundle as one ONNX / TorchScript
    file, checked against eager. Several tasks share the backbone once and take a `task_index` input."""
    from vpt_cli.export import export_model
    from vpt_cli.serving import load_tasks

    names = tasks if isinstance(tasks, list) else [tasks]
    if len(names) == 1:
        loaded = load_for_inference(names[0], backbone_weights, device="cpu")
        return export_model(loaded.model, loaded.backbone.img_size, fmt, Path(output))
    server = load_tasks(names, backbone_weights, device="cpu")
    return export_model(server.model, server.backbone.img_size, fmt, Path(output))
