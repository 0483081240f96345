"""The library API: train, sweep, evaluate, predict and export tasks without the CLI.

Each function composes data, backbone, model, engine and artifact, and returns a result object
that the CLI renders (or that `--json` dumps). Nothing here prints; progress goes to a Reporter.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vpt_cli.artifact.home import resolve_task_path, task_name_from
from vpt_cli.config import RunConfig
from vpt_cli.core.errors import DataError, PredictError, TrainingInterrupted, UsageError
from vpt_cli.core.fileio import numbered_dir
from vpt_cli.data import (
    ImageDataset,
    LabelFormat,
    Sample,
    auto_workers,
    build_transform,
    collate_skip_bad,
    decode_size,
    failure_reason,
    list_images,
    load_image,
    make_loader,
    read_eval_split,
    read_task_requests,
    validate_samples,
)
from vpt_cli.evaluation.files import EvalResult, write_eval_files, write_multilabel_files
from vpt_cli.evaluation.metrics import calibration, shot_group_accuracy
from vpt_cli.evaluation.plots import render_labelled_image
from vpt_cli.evaluation.report import (
    LabelSetPrediction,
    SamplePrediction,
)
from vpt_cli.export.metadata import export_metadata
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.objectives import Objective
from vpt_cli.runtime import distributed
from vpt_cli.runtime.context import RunContext
from vpt_cli.runtime.reporting import Reporter
from vpt_cli.serving.loading import load_for_inference
from vpt_cli.serving.tasks import load_tasks
from vpt_cli.training.engine import FitResult, evaluate_tuned, fit
from vpt_cli.training.engine import evaluate as run_evaluation
from vpt_cli.training.outputs import EpochWriter, TrainResult, save_trained
from vpt_cli.training.prepare import check_run, prepare_run
from vpt_cli.training.probe import probe_init_head
from vpt_cli.training.resume import Checkpoint, run_settings, settings_config
from vpt_cli.training.run_folder import CHECKPOINT_FILE, RunFolder, claim_task, default_task_name
from vpt_cli.training.sweep import SweepReporter, SweepResult, plan_sweep, run_sweep


def train(config: RunConfig, task: str | None = None, force: bool = False, resume: bool = False,
          reporter: Reporter | None = None, folder: RunFolder | None = None) -> TrainResult:
    """Train a task on `config.data.path` and save it to the registry (or to a task file path).

    The task is locked for the run; an existing task needs `force`, and `resume` continues the
    last finished epoch of an interrupted run with the same settings (checked before anything
    is loaded). Ctrl-C or SIGTERM raise TrainingInterrupted, saying what can be resumed. The run's
    files go to `folder` (default `runs/train/<task>` under the current folder, numbered):
    args.yaml, results.csv/png, best/last.safetensors, skipped.txt and the checkpoint.
    Under torchrun every process trains its share of each global batch (README, "Several GPUs or
    machines"); rank 0 alone writes and reports.
    """
    distributed.join_from_env(config.train.device)
    reporter = distributed.main_reporter(reporter or Reporter())
    started = time.perf_counter()
    settings = run_settings(config)  # as given, before 'auto' values are resolved
    splits = check_run(config)  # every refusal that needs no run folder, before one exists
    with claim_task(config, task, force=force, resume=resume, folder=folder) as claimed:
        try:
            run = prepare_run(config, claimed, splits, reporter)
        except KeyboardInterrupt as exc:
            what = ("continue with --resume" if claimed.checkpoint.exists() and resume
                    else "nothing to resume; run the same command again")
            raise TrainingInterrupted(f"interrupted before training started: {what}",
                                      exit_code=getattr(exc, "exit_code", 130)) from None
        reporter.log(f"run folder {claimed.run_dir}")
        config = run.config  # resolved against the backbone: what runs
        context = RunContext(device=run.device, amp=config.train.amp, reporter=reporter)
        model = PromptedViT(run.backbone.model, len(run.classes), config.prompt)
        if not config.prompt.info.trains_in_epochs:  # the linear probe: its fit is the whole run
            model.to(run.device)
            probe_acc = probe_init_head(model, run.probe_loader, run.val_loader, context,
                                        run.objective)
            objective, report = (evaluate_tuned(model, run.val_loader, run.classes, context, run.objective)
                                 if run.val_loader else (run.objective, None))
            result = FitResult([], 0, report, False, 0.0, probe_acc, objective=objective)
        else:
            writer = (EpochWriter(run, config, tensorboard=bool(folder and folder.tensorboard))
                      if distributed.is_main() else None)
            try:
                result = fit(model, run.train_loader, run.val_loader, run.probe_loader, run.classes, config.train,
                             context, claimed.checkpoint, resume=resume, settings=settings,
                             objective=run.objective, on_epoch=writer)
            finally:
                if writer is not None:
                    writer.close()
        test = (run_evaluation(model, run.test_loader, run.classes, context, "test",
                               objective=result.objective)
                if run.test_loader else None)
        return save_trained(run, model, config, result, started, test_report=test)


def resume(task: str | None, given: dict[str, Any], folder: RunFolder | None = None,
           reporter: Reporter | None = None) -> TrainResult:
    """Continue an interrupted `train` with every setting its checkpoint holds; of the options the
    user `given` (dotted config keys, None = not given) only the epochs (to extend the run), the
    device and the worker count may change, anything else that differs is refused. The run is
    found by its task (and `folder`), or `given["data.path"]` may be the run folder itself."""
    folder = folder or RunFolder()
    data = given.get("data.path")
    if data and (Path(data) / CHECKPOINT_FILE).is_file():  # `vpt train runs/train/birds2 --resume`
        run_dir = Path(data).resolve()
        given = {key: value for key, value in given.items() if key != "data.path"}
        task = task or Checkpoint(run_dir / CHECKPOINT_FILE).saved_task() or run_dir.name
        folder = RunFolder(project=run_dir.parent, name=run_dir.name, tensorboard=folder.tensorboard)
    elif task is None:  # train's default: the data folder's name
        task = default_task_name(data)
    run_dir = Path(folder.project) / (folder.name or task_name_from(resolve_task_path(task)))
    config = settings_config(Checkpoint(run_dir / CHECKPOINT_FILE).settings(), given)
    return train(config, task=task, resume=True, reporter=reporter,
                 folder=RunFolder(project=folder.project, name=folder.name, exist_ok=True,
                                  tensorboard=folder.tensorboard))


def sweep(config: RunConfig, lrs: list[float], weight_decays: list[float], prompt_lengths: list[int | None],
          eta: int = 3, budget: str | None = None, task: str | None = None, force: bool = False,
          reporter: SweepReporter | None = None, folder: RunFolder | None = None,
          fourier_fractions: list[float | None] | None = None) -> SweepResult:
    """Search lr x weight decay (x prompt length, x Fourier fraction for vfpt) on the val split
    with successive halving and keep the best trial as the task (vpt_cli.training.sweep)."""
    distributed.refuse_under_torchrun("vpt sweep", "its trials run one after another on one device")
    plan = plan_sweep(lrs, weight_decays, prompt_lengths, config.train.epochs, eta, budget,
                      fourier_fractions=fourier_fractions)
    return run_sweep(config, plan, task=task, force=force, reporter=reporter,
                     folder=folder or RunFolder(project="runs/sweep"))


def evaluate(data: str | Path, task: str | Path, backbone_weights: str | None = None, batch_size: int = 64,
             device: str = "auto", workers: int | None = None, amp: bool = False, output_dir: str | Path | None = None,
             reporter: Reporter | None = None, *, split: str | None = None, data_format: str = "auto",
             label_sep: str = ";") -> EvalResult:
    """Metrics of a task on DATA in any reader's format (vpt_cli.data.readers): class folders (or
    DATA/<split>), or one split of a CSV, VTAB lists or FGVC JSON (default test, else val).
    Classes unknown to the task are reported. A multi-label task reads a CSV's label cells as
    label sets (split by `label_sep`) and is scored at its stored thresholds (`_write_multilabel_files`).

    Writes a run folder (default `runs/eval/<task>` under the current folder, numbered `<task>2`,
    ... rather than overwriting; `output_dir` to choose one): metrics.json, confusion.csv,
    confusion.png, confusion_normalized.png, reliability.png (with the expected calibration
    error), predictions.csv (file, true, predicted, confidence) and a self-contained report.html.
    Under torchrun each process evaluates its share of every batch; rank 0 writes the whole set's.
    """
    distributed.join_from_env(device)
    reporter = distributed.main_reporter(reporter or Reporter())
    name = task_name_from(task)  # what the user typed (or the file's stem), never the file's metadata
    loaded = load_for_inference(task, backbone_weights, device)
    classes = loaded.classes
    objective = loaded.task.info.new_objective()
    samples, skipped_files, unknown = read_eval_split(Path(data), classes, split, data_format,
                                                      LabelFormat(objective.multi_label, label_sep))
    size = decode_size(loaded.backbone.data_config)
    good, bad = validate_samples(samples, target=size)
    skipped = [(str(p), r) for p, r in skipped_files + bad]
    if not good:
        raise DataError(f"no readable images of the task's classes in {data}")
    dataset = ImageDataset(good, build_transform(loaded.backbone.data_config, train=False),
                           partial(load_image, target=size))  # one pass: draft decoding, no cache
    loader = make_loader(dataset, batch_size, False, workers, 0, shard=distributed.shard())
    found: list[tuple[int, SamplePrediction | LabelSetPrediction]] = []

    def keep(indices: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if objective.multi_label:
            found.extend((i, label_set(str(good[i].path), classes, row, target, objective))
                         for i, row, target in zip(indices.tolist(), logits, labels))
            return
        confidence, predicted = objective.scores(logits).max(1)
        found.extend((i, SamplePrediction(str(good[i].path), classes[t], classes[p], c))
                     for i, t, p, c in zip(indices.tolist(), labels.tolist(), predicted.tolist(), confidence.tolist()))

    report = run_evaluation(loaded.model, loader, classes, RunContext(loaded.device, amp, reporter), on_batch=keep,
                            objective=objective)
    answers = [answer for _, answer in sorted(distributed.gather_lists(found), key=lambda pair: pair[0])]
    skipped += distributed.gather_lists([(str(path), reason) for path, reason in loader.dataset.failures])
    calibrated = None
    if not objective.multi_label:
        counts = loaded.task.info.provenance.get("class_counts")
        if isinstance(counts, list) and len(counts) == len(classes) and all(type(n) is int and n >= 0 for n in counts):
            report.shot_groups = shot_group_accuracy(report, counts)  # a task file is untrusted: used only if well-formed
        calibrated = calibration(torch.tensor([a.confidence for a in answers]),
                                 torch.tensor([a.true == a.predicted for a in answers]))

    def write() -> EvalResult:
        try:
            out = Path(output_dir) if output_dir else numbered_dir(Path("runs") / "eval", name)
            result = EvalResult(name, report, calibrated, unknown, skipped, out, {}, objective.name)
            writer = write_multilabel_files if objective.multi_label else write_eval_files
            writer(result, answers, title=f"{name} on {Path(data).resolve().name}")
        except OSError as exc:
            raise UsageError(f"cannot write the eval files to {output_dir or 'runs/eval'}: {exc.strerror or exc}") from None
        return result

    return distributed.from_main(write)


def label_set(file: str, classes: list[str], logits: torch.Tensor, target: torch.Tensor,
               objective: Objective) -> LabelSetPrediction:
    """One multi-label image's labels, answer (the classes at or over their threshold) and scores."""
    scores = objective.scores(logits)
    return LabelSetPrediction(file, [c for c, hot in zip(classes, target.tolist()) if hot],
                              [name for name, _ in objective.answer(logits, classes, None)], scores.tolist(),
                              float((target.to(scores.dtype) - scores).abs().sum()))

@dataclass
class Prediction:
    file: str
    task: str
    top: list[tuple[str, float]]  # (class, probability), best first; multi-label: the labels over threshold


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

def predict(inputs: list[str], task: str | Path | list[str | Path], top_k: int | None = None,
            backbone_weights: str | None = None, batch_size: int | None = None, device: str = "auto",
            workers: int | None = None, amp: bool = False, reporter: Reporter | None = None,
            tasks_from: str | Path | None = None) -> PredictResult:
    """Each task's answer for image files, folders and globs; unreadable inputs are reported, not fatal.

    The answer is the `top_k` classes, or without `top_k` the task's own: its 3 most probable
    classes, or for a multi-label task every class whose sigmoid score reaches its threshold.

    Several tasks share every batch: each image is paired with each of its tasks (all of `task`,
    or its rows of the `tasks_from` CSV) and all pairs take one backbone pass. `batch_size`
    counts pairs; None picks one for the device. Under torchrun each process answers a contiguous
    block of the images and every process returns all answers, in the single-process order.
    """
    distributed.join_from_env(device)
    reporter = distributed.main_reporter(reporter or Reporter())
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
    block = distributed.own_block(len(files))  # this process's images; the answers are gathered below
    everything, files, wanted = files, files[block], wanted[block]
    listed_failures, failures = failures, []
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
            answers = server.top_k(server.logits(batch[0][rows], task_index, amp), task_index,
                                   None if top_k is None else max(1, top_k))
            pairs = [(index, t) for index in indices for t in wanted[index]]
            predictions += [Prediction(str(files[index]), server.names[t], top) for (index, t), top in zip(pairs, answers)]
            read += len(indices)
        reporter.advance(len(expected))
    reporter.finish()
    elapsed = time.perf_counter() - started
    predictions = distributed.gather_lists(predictions)
    failures = listed_failures + distributed.gather_lists(failures)
    read = int(distributed.sum_values(read)[0])
    if not predictions:
        raise PredictError(f"none of the {len(everything)} inputs could be read (first: {failures[0][0]}: {failures[0][1]})")
    return PredictResult(server.names, predictions, failures, read / max(elapsed, 1e-9), read)


def save_labelled_images(result: PredictResult, save_dir: str | Path, force: bool = False) -> list[Path]:
    """Each predicted image with its answers drawn above it (one line per task: its classes and
    probabilities), as `<stem>.png` in `save_dir`; an existing file is kept unless `force`."""
    save_dir = Path(save_dir)
    by_file: dict[str, list[Prediction]] = {}
    for prediction in result.predictions:
        by_file.setdefault(prediction.file, []).append(prediction)
    written, used = [], set()
    for file, predictions in by_file.items():
        stem, number = Path(file).stem, 1
        while f"{stem}.png" in used:
            number += 1
            stem = f"{Path(file).stem}_{number}"
        used.add(f"{stem}.png")
        target = save_dir / f"{stem}.png"
        if target.exists() and not force:
            raise UsageError(f"{target} exists; pass --force to overwrite it")
        lines = [f"{p.task}: " + (", ".join(f"{name} {prob:.2f}" for name, prob in p.top) or "none") for p in predictions]
        try:
            render_labelled_image(load_image(Path(file)), lines, target)
        except OSError as exc:
            raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from None
        written.append(target)
    return written


def export(tasks: str | Path | list[str | Path], fmt: str, output: str | Path | None = None,
           backbone_weights: str | None = None, dynamic_size: bool = False) -> Any:
    """Write one task (backbone + prompts + head) or a multi-task bundle as one ONNX / TorchScript
    file, checked against eager. Several tasks share the backbone once and take a `task_index`
    input. The file carries the class names, preprocessing and task names as metadata; `output`
    defaults to `<task>.onnx` / `<task>.pt` in the current folder (`<a>_<b>` for a bundle).
    `dynamic_size`: ONNX inputs of any height and width (plain ViT backbones)."""
    from vpt_cli.export.exporter import export_model  # late: the exporters load only when asked for

    names = tasks if isinstance(tasks, list) else [tasks]
    if len(names) == 1:
        loaded = load_for_inference(names[0], backbone_weights, device="cpu")
        model, backbone, infos = loaded.model, loaded.backbone, [loaded.task.info]
    else:
        server = load_tasks(names, backbone_weights, device="cpu")
        model, backbone, infos = server.model, server.backbone, server.infos
    typed = [task_name_from(name) for name in names]
    target = Path(output) if output else Path(f"{'_'.join(typed)}.{'onnx' if fmt == 'onnx' else 'pt'}")
    metadata = {**export_metadata(typed, infos, backbone), "dynamic_size": json.dumps(dynamic_size)}
    return export_model(model, backbone.img_size, fmt, target, metadata=metadata, dynamic_size=dynamic_size)


