"""The library API: train, sweep, evaluate, predict and export tasks without the CLI.

Each function composes data, backbone, model, engine and artifact, and returns a result object
that the CLI renders (or that `--json` dumps). Nothing here prints; progress goes to a Reporter.
"""
from __future__ import annotations

import time
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vpt_cli.home import runs_dir, task_name_from
from vpt_cli.config import RunConfig
from vpt_cli.data import (ImageDataset, Sample, auto_workers, build_transform, collate_skip_bad, decode_size,
                          failure_reason, list_images, load_image, make_loader, read_eval_split, read_task_requests,
                          validate_samples)
from vpt_cli.engine import FitResult, evaluate as run_evaluation, fit
from vpt_cli.errors import DataError, PredictError, TrainingInterrupted, UsageError
from vpt_cli.inference import load_for_inference
from vpt_cli.metrics import EvalReport, shot_group_accuracy, write_confusion_csv
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.plots import render_confusion_png
from vpt_cli.probe import probe_init_head
from vpt_cli.reporting import Reporter
from vpt_cli.serving import load_tasks
from vpt_cli.sweep import SweepReporter, SweepResult, plan_sweep, run_sweep
from vpt_cli.training import TrainResult, claim_task, prepare_run, run_settings, save_trained


def train(config: RunConfig, task: str | None = None, force: bool = False, resume: bool = False,
          reporter: Reporter | None = None) -> TrainResult:
    """Train a task on `config.data.path` and save it to the registry (or to a task file path).

    The task is locked for the run; an existing task needs `force`, and `resume` continues the
    last finished epoch of an interrupted run with the same settings (checked before anything
    is loaded). Ctrl-C or SIGTERM raise TrainingInterrupted, saying what can be resumed.
    """
    reporter = reporter or Reporter()
    started = time.perf_counter()
    with claim_task(config, task, force=force, resume=resume) as claimed:
        try:
            run = prepare_run(config, claimed, reporter)
        except KeyboardInterrupt as exc:
            what = ("continue with --resume" if claimed.checkpoint.exists() and resume
                    else "nothing to resume; run the same command again")
            raise TrainingInterrupted(f"interrupted before training started: {what}",
                                      exit_code=getattr(exc, "exit_code", 130)) from None
        model = PromptedViT(run.backbone.model, len(run.classes), config.prompt)
        if config.prompt.method == "linear":
            model.to(run.device)
            probe_acc = probe_init_head(model, run.probe_loader, run.val_loader, run.device, config.train.amp, reporter,
                                        run.balance)
            report = (run_evaluation(model, run.val_loader, run.classes, run.device, config.train.amp, reporter, "val")
                      if run.val_loader else None)
            result = FitResult([], 0, report, False, 0.0, probe_acc)
        else:
            result = fit(model, run.train_loader, run.val_loader, run.probe_loader, run.classes, config.train,
                         run.device, claimed.checkpoint, reporter, resume=resume, settings=run_settings(config),
                         balance=run.balance)
        test = (run_evaluation(model, run.test_loader, run.classes, run.device, config.train.amp, reporter, "test")
                if run.test_loader else None)
        return save_trained(run, model, config, result, started, test_report=test)


def sweep(config: RunConfig, lrs: list[float], weight_decays: list[float], prompt_lengths: list[int | None],
          eta: int = 3, budget: str | None = None, task: str | None = None, force: bool = False,
          reporter: SweepReporter | None = None) -> SweepResult:
    """Search lr x weight decay (x prompt length) on the val split with successive halving and
    keep the best trial as the task (vpt_cli.sweep)."""
    plan = plan_sweep(lrs, weight_decays, prompt_lengths, config.train.epochs, eta, budget)
    return run_sweep(config, plan, task=task, force=force, reporter=reporter)


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
             reporter: Reporter | None = None, *, split: str | None = None, data_format: str = "auto") -> EvalResult:
    """Metrics of a task on DATA in any reader's format (vpt_cli.data.readers): class folders (or
    DATA/<split>), or one split of a CSV, VTAB lists or FGVC JSON (default test, else val).
    Classes unknown to the task are reported."""
    reporter = reporter or Reporter()
    loaded = load_for_inference(task, backbone_weights, device)
    classes = loaded.classes
    samples, skipped_files, unknown = read_eval_split(Path(data), classes, split, data_format)
    size = decode_size(loaded.backbone.data_config)
    good, bad = validate_samples(samples, target=size)
    skipped = [(str(p), r) for p, r in skipped_files + bad]
    if not good:
        raise DataError(f"no readable images of the task's classes in {data}")
    dataset = ImageDataset(good, build_transform(loaded.backbone.data_config, train=False),
                           partial(load_image, target=size))  # one pass: draft decoding, no cache
    loader = make_loader(dataset, batch_size, False, workers, 0)
    report = run_evaluation(loaded.model, loader, classes, loaded.device, amp, reporter)
    counts = loaded.task.info.provenance.get("class_counts")
    if isinstance(counts, list) and len(counts) == len(classes) and all(type(n) is int and n >= 0 for n in counts):
        report.shot_groups = shot_group_accuracy(report, counts)  # a task file is untrusted: used only if well-formed
    name = task_name_from(task)  # what the user typed (or the file's stem), never the file's metadata
    out = Path(output_dir) if output_dir else runs_dir(name) / "eval"
    csv_path, png_path = out / "confusion.csv", out / "confusion.png"
    try:
        write_confusion_csv(report, csv_path)
        render_confusion_png(report, png_path, title=f"{name} on {Path(data).name}")
    except OSError as exc:
        raise UsageError(f"cannot write the eval files to {out}: {exc.strerror or exc}") from None
    return EvalResult(name, report, unknown, skipped, csv_path, png_path)


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

def predict(inputs: list[str], task: str | Path | list[str | Path], top_k: int = 5, backbone_weights: str | None = None,
            batch_size: int | None = None, device: str = "auto", workers: int | None = None, amp: bool = False,
            reporter: Reporter | None = None, tasks_from: str | Path | None = None) -> PredictResult:
    """Top-k classes of each task for image files, folders and globs; unreadable inputs are reported, not fatal.

    Several tasks share every batch: each image is paired with each of its tasks (all of `task`,
    or its rows of the `tasks_from` CSV) and all pairs take one backbone pass. `batch_size`
    counts pairs; None picks one for the device.
    """
    reporter = reporter or Reporter()
    names = [str(task)] if isinstance(task, (str, Path)) else [str(t) for t in task]
    if tasks_from is not None:
        if inputs or names:
            raise UsageError("give images with --task, or --tasks-from, not both")
        files, requested, failures = read_task_requests(Path(tasks_from))
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
    dataset = ImageDataset([Sample(file, 0) for file in files], server.transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=image_batch, shuffle=False, collate_fn=collate_skip_bad,
                                         num_workers=auto_workers(len(files)) if workers is None else workers)
    predictions: list[Prediction] = []
    read = 0
    started = time.perf_counter()
    reporter.start("predict", len(files))
    for number, batch in enumerate(loader):
        expected = range(number * image_batch, min(len(files), (number + 1) * image_batch))
        indices = batch[2].tolist() if batch is not None else []
        failures += [(str(files[i]), failure_reason(files[i])) for i in sorted(set(expected) - set(indices))]
        if batch is not None:
            rows = torch.tensor([row for row, index in enumerate(indices) for _ in wanted[index]])
            task_index = torch.tensor([t for index in indices for t in wanted[index]])
            answers = server.top_k(server.logits(batch[0][rows], task_index, amp), task_index, max(1, top_k))
            pairs = [(index, t) for index in indices for t in wanted[index]]
            predictions += [Prediction(str(files[index]), server.names[t], top) for (index, t), top in zip(pairs, answers)]
            read += len(indices)
        reporter.advance(len(expected))
    reporter.finish()
    elapsed = time.perf_counter() - started
    if not predictions:
        raise PredictError(f"none of the {len(files)} inputs could be read (first: {failures[0][0]}: {failures[0][1]})")
    return PredictResult(server.names, predictions, failures, read / max(elapsed, 1e-9), read)


def export(tasks: str | Path | list[str | Path], fmt: str, output: str | Path,
           backbone_weights: str | None = None) -> Any:
    """Write one task (backbone + prompts + head) or a multi-task bundle as one ONNX / TorchScript
    file, checked against eager. Several tasks share the backbone once and take a `task_index` input."""
    from vpt_cli.export import export_model  # late: the exporters load only when asked for

    names = tasks if isinstance(tasks, list) else [tasks]
    if len(names) == 1:
        loaded = load_for_inference(names[0], backbone_weights, device="cpu")
        return export_model(loaded.model, loaded.backbone.img_size, fmt, Path(output))
    server = load_tasks(names, backbone_weights, device="cpu")
    return export_model(server.model, server.backbone.img_size, fmt, Path(output))
