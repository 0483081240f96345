"""What a trained run leaves behind: the task file with its metadata, best/last after every epoch, results.csv/png, skipped.txt, and the result object."""
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
from vpt_cli.artifact.schema import Task, TaskInfo, save_task
from vpt_cli.config import RunConfig
from vpt_cli.core.errors import UsageError
from vpt_cli.core.fileio import write_text
from vpt_cli.evaluation.metrics import EvalReport
from vpt_cli.evaluation.multilabel import MultiLabelReport
from vpt_cli.evaluation.plots import render_history_png
from vpt_cli.models.folding import fold_task_state
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.objectives import Objective
from vpt_cli.runtime import distributed
from vpt_cli.runtime.reporting import EpochStats
from vpt_cli.training.engine import FitResult, TrainingRun
from vpt_cli.training.prepare import PreparedRun
from vpt_cli.training.run_folder import write_skipped


@dataclass
class TrainResult:
    task_path: Path
    task_name: str
    classes: list[str]
    val_report: EvalReport | MultiLabelReport | None
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
    test_report: EvalReport | MultiLabelReport | None = None  # --trainval: the test split, never used for selection

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




def task_file(run: PreparedRun, config: RunConfig, state: dict[str, torch.Tensor],
              report: EvalReport | MultiLabelReport | None, provenance: dict[str, Any],
              test_report: EvalReport | MultiLabelReport | None = None, objective: Objective | None = None) -> Task:
    """The task file of a model's raw `state` from this run: the method's prompt transform folded
    into the prompts it stores (vpt_cli.models.folding), and what it says about itself."""
    tensors, prompt = fold_task_state(state, config.prompt)
    return Task(task_info(run, config, prompt, report, provenance, test_report, objective), tensors)


def task_info(run: PreparedRun, config: RunConfig, prompt: dict[str, Any], report: EvalReport | MultiLabelReport | None,
              provenance: dict[str, Any], test_report: EvalReport | MultiLabelReport | None = None,
              objective: Objective | None = None) -> TaskInfo:
    """What a task file made from this run says about itself (`prompt`: the stored prompts' own
    metadata, folded ones say so; `test_report`: --trainval's test split, scored once and never
    selected on; `objective`: as tuned after training, default the run's own)."""
    objective = objective or run.objective
    return TaskInfo(
        objective=objective.name, thresholds=objective.task_thresholds(),
        name=run.name, backbone=run.backbone.name, backbone_fingerprint=run.backbone.fingerprint,
        img_size=run.backbone.img_size, data_config=_jsonable(run.backbone.data_config), prompt=prompt,
        classes=run.classes, backbone_kwargs=config.backbone.kwargs, backbone_weights=run.backbone.weights,
        metrics={**(report.summary("val") if report else {}), **(test_report.summary("test") if test_report else {})},
        provenance={
            "data": str(Path(config.data.path).resolve()), "split": run.split_source, "num_train": run.num_train,
            "num_val": run.num_val, "seed": config.train.seed, "stores": config.prompt.info.stores,
            "class_counts": run.class_counts,
            **({"shots": {"k": config.data.shot_count, "files": run.shot_files}} if run.shot_files is not None else {}),
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
        save_task(task_file(run, config, training.model.task_state_dict(), None,
                            {"epoch": last_report.epoch, "kept": "last", "val_top1": last_report.val_acc}),
                  run.run_dir / "last.safetensors", force=True)
        save_task(task_file(run, config, training.best_state, None,
                            {"epoch": training.state["best_epoch"], "kept": "best"}),
                  run.run_dir / "best.safetensors", force=True)
        write_results(run.run_dir, history, training.state["probe_val_acc"], training.state["best_epoch"],
                      run.objective.score_columns)
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



def write_results(run_dir: Path, history: list[EpochStats], probe_acc: float | None, kept_epoch: int,
                  score_columns: tuple[str, str] = ("val_acc", "val_balanced_acc")) -> None:
    """results.csv (one row per epoch) and results.png (curves, probe start, kept epoch). The two
    val score columns are named by the objective (val_map, val_macro_f1 for multi-label tasks)."""
    fields = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc",
              "images_per_sec", "seconds")
    named = dict(zip(("val_acc", "val_balanced_acc"), score_columns))
    lines = [",".join(named.get(f, f) for f in fields)] + [
        ",".join("" if getattr(h, f) is None else f"{getattr(h, f):.6g}" for f in fields) for h in history]
    write_text(run_dir / "results.csv", "\n".join(lines) + "\n")
    if history:
        render_history_png([asdict(h) for h in history], run_dir / "results.png", probe_acc=probe_acc,
                           kept_epoch=kept_epoch)



def save_trained(run: PreparedRun, model: PromptedViT, config: RunConfig, result: FitResult, started: float,
                 extra_provenance: dict[str, Any] | None = None, test_report: EvalReport | None = None) -> TrainResult:
    """Write the task file (its metadata says what it stores and how it was made) and the run's
    results; `config` is the trained model's own (a sweep's winner differs from `run.config`)."""
    report, history = result.best_report, result.history
    skipped = run.skipped + [item for item in failures_while_loading(run) if item not in run.skipped]
    saved = task_file(run, config, model.task_state_dict(), report,
                      {"skipped": len(skipped), "best_epoch": result.best_epoch, "selection": result.selection,
                       "head_refit": result.head_refit, "epochs_run": len(history), "run_dir": str(run.run_dir),
                       **(extra_provenance or {})},
                      test_report=test_report, objective=result.objective)
    if distributed.is_main():
        save_task(saved, run.task_path, force=True)  # claim_task already refused an unwanted overwrite
        if result.head_refit:  # best.safetensors is the kept epoch: now with the head the task has
            save_task(saved, run.run_dir / "best.safetensors", force=True)
        write_skipped(run.run_dir, skipped)
        write_results(run.run_dir, history, result.probe_val_acc, result.best_epoch, result.objective.score_columns)
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




def failures_while_loading(run: PreparedRun) -> list[tuple[str, str]]:
    """Images that passed the header check up front but failed to decode during training (in any
    process)."""
    loaders = (run.train_loader, run.probe_loader, run.val_loader, run.test_loader)
    found = distributed.gather_lists([(str(path), reason) for loader in loaders if loader is not None
                                      for path, reason in loader.dataset.failures])
    return list(dict.fromkeys(found))



def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
