"""Human-readable rendering of library results with rich (the CLI's non-JSON output)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from vpt_cli.artifact.registry import TaskEntry
from vpt_cli.artifact.schema import TaskInfo
from vpt_cli.core.safetext import safe
from vpt_cli.methods import get_method

if TYPE_CHECKING:  # result types only: `vpt tasks` renders without importing torch
    from vpt_cli.api import PredictResult
    from vpt_cli.evaluation.files import EvalResult
    from vpt_cli.training.outputs import TrainResult
    from vpt_cli.training.sweep import SweepResult, Trial


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def render_train(console: Console, result: TrainResult) -> None:
    report, test = result.val_report, result.test_report
    ratio = result.task_bytes / max(result.backbone_bytes, 1)
    kept = (f"{result.selection} epoch {result.best_epoch}" + (", stopped early" if result.stopped_early else "")
            if result.history else "no epochs: linear probe")
    lines = [
        f"[green]saved[/] task [bold]{safe(result.task_name)}[/] -> {safe(result.task_path)}",
        f"  classes        {len(result.classes)} ({safe(', '.join(result.classes[:8]))}{', ...' if len(result.classes) > 8 else ''})",
        f"  images         {result.num_train} train, {result.num_val} val"
        + (f", {len(result.skipped)} skipped (see {safe(result.run_dir / 'skipped.txt')})" if result.skipped else ""),
        f"  {'val ' + (report.score_name if report else 'top-1'):<15}{_pct(report.score if report else None)} ({kept})"
        + (f", macro F1 {report.macro_f1:.3f} at the tuned thresholds" if report and report.score_name == "mAP" else ""),
        *([f"  {'test ' + test.score_name:<15}{_pct(test.score)} (--trainval: scored once, never selected on)"]
          if test else []),
        (f"  probe start    {_pct(result.probe_val_acc)} val {report.score_name if report else 'top-1'}: the linear "
         "probe fitted on the prompted start, before prompt training" if result.history else None),
        f"  task file      {result.task_bytes / 1e3:.1f} KB = {100 * ratio:.3f}% of the backbone "
        f"({result.backbone_bytes / 1e6:.1f} MB); {result.trainable_params:,} trained parameters",
        (f"  speed          {result.train_images_per_sec:.1f} train img/s, {result.seconds:.0f}s in all"
         if result.history else f"  time           {result.seconds:.0f}s (features once, then a logistic regression; no epochs)"),
        f"  run folder     {safe(result.run_dir)} ({safe(', '.join(sorted(p.name for p in result.run_dir.iterdir())))})",
    ]
    for line in lines:
        if line is not None:
            console.print(line, highlight=False)


def render_eval(console: Console, result: EvalResult) -> None:
    if result.calibration is None:
        render_multilabel_eval(console, result)
        return
    report = result.report
    table = Table(title=f"{safe(result.task_name)}: per-class metrics", title_justify="left")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in report.per_class:
        table.add_row(safe(row.name), f"{row.precision:.3f}", f"{row.recall:.3f}", f"{row.f1:.3f}", str(row.support))
    console.print(table)
    console.print(
        f"top-1 {_pct(report.top1)}  top-5 {_pct(report.top5)}  balanced acc {_pct(report.balanced_accuracy)}  "
        f"macro F1 {report.macro_f1:.3f}  on {report.num_samples} images", highlight=False)
    if report.shot_groups:
        console.print("  ".join(f"{name}-shot {_pct(acc)}" for name, acc in report.shot_groups.items())
                      + "  (classes with >100 / 20-100 / <20 training images)", highlight=False)
    if result.unknown_classes:
        console.print(f"[yellow]not evaluated[/]: folders unknown to the task: {safe(', '.join(result.unknown_classes))}",
                      highlight=False)
    if result.skipped:
        console.print(f"[yellow]skipped[/] {len(result.skipped)} unreadable files", highlight=False)
    console.print(f"expected calibration error {_pct(result.calibration.ece)}", highlight=False)
    console.print(f"results in {safe(result.run_dir)}: report.html, metrics.json, predictions.csv, confusion*.png, "
                  "reliability.png", highlight=False)


def render_multilabel_eval(console: Console, result: EvalResult) -> None:
    report = result.report
    table = Table(title=f"{safe(result.task_name)}: per-class metrics", title_justify="left")
    for column in ("class", "AP", "f1", "precision", "recall", "support", "threshold"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in report.per_class:
        table.add_row(safe(row.name), "-" if row.ap is None else f"{row.ap:.3f}", f"{row.f1:.3f}",
                      f"{row.precision:.3f}", f"{row.recall:.3f}", str(row.support), f"{row.threshold:.3f}")
    console.print(table)
    console.print(
        f"mAP {_pct(report.mean_ap)}  macro F1 {report.macro_f1:.3f}  micro F1 {report.micro_f1:.3f}  "
        f"(P {report.micro_precision:.3f}, R {report.micro_recall:.3f})  exact match {_pct(report.exact_match)}  "
        f"Hamming loss {report.hamming_loss:.4f}  on {report.num_samples} images", highlight=False)
    if result.unknown_classes:
        console.print(f"[yellow]not scored[/]: labels unknown to the task: {safe(', '.join(result.unknown_classes))}",
                      highlight=False)
    if result.skipped:
        console.print(f"[yellow]skipped[/] {len(result.skipped)} unreadable files", highlight=False)
    console.print(f"results in {safe(result.run_dir)}: report.html, metrics.json, predictions.csv, ap.png",
                  highlight=False)


def render_predictions(console: Console, result: PredictResult) -> None:
    several = len(result.tasks) > 1
    k = max((len(p.top) for p in result.predictions), default=1)
    table = Table(title=f"{safe(', '.join(result.tasks))}: predictions", title_justify="left")
    table.add_column("image")
    if several:
        table.add_column("task")
    for rank in range(1, k + 1):
        table.add_column(f"#{rank}")
    for prediction in result.predictions:
        table.add_row(safe(prediction.file), *([safe(prediction.task)] if several else []),
                      *([f"{safe(name)} [dim]{prob:.2f}[/]" for name, prob in prediction.top] or ["[dim]none[/]"]))
    console.print(table)


def sweep_table(trials: list[Trial], title: str = "sweep") -> Table:
    """One row per trial: its grid point, where it got to, and its best val score so far."""
    table = Table(title=title, title_justify="left")
    for column in ("#", "prompts", "lr", "wd", "epochs", "val top-1", "val loss", "time", "status"):
        table.add_column(column, justify="left" if column == "status" else "right")
    for t in trials:
        style = "bold green" if t.status.endswith("(best)") else "dim" if t.status.startswith(("stopped", "not run")) else None
        table.add_row(str(t.index), str(t.num_prompts), f"{t.lr:.0e}", f"{t.weight_decay:g}", str(t.epochs_run),
                      _pct(t.val_top1), f"{t.val_loss:.3f}" if t.val_loss is not None else "-", f"{t.seconds:.0f}s",
                      t.status, style=style)
    return table


def render_sweep(console: Console, result: SweepResult) -> None:
    best = result.best
    console.print(
        f"best: trial {best.index} (prompts {best.num_prompts}, lr {best.lr:g}, weight decay {best.weight_decay:g}) "
        f"val top-1 {_pct(best.val_top1)} after {best.epochs_run} epochs; rungs {result.plan.rungs}, "
        f"eta {result.plan.eta}, budget {result.plan.budget_text}, {result.seconds:.0f}s in all", highlight=False)
    console.print(f"all trials: {safe(result.csv_path)}", highlight=False)
    render_train(console, result.train)


def render_tasks(console: Console, entries: list[TaskEntry], registry: Path) -> None:
    if not entries:
        console.print(f"no tasks yet in {safe(registry)} (train one with [bold]vpt train DATA --task NAME[/])")
        return
    table = Table(title=f"tasks in {safe(registry)}", title_justify="left")
    for column in ("name", "method", "backbone", "img size", "classes", "val top-1 | mAP", "size", "created"):
        table.add_column(column, no_wrap=column in ("name", "backbone"), overflow="fold")
    for entry in entries:
        size = f"{entry.path.stat().st_size / 1e3:.0f} KB"
        info = entry.info
        if info is None:
            table.add_row(safe(entry.name), f"[red]unusable: {safe(entry.error)}[/]", "-", "-", "-", "-", size, "-")
            continue
        top1 = info.metrics.get("val_top1", info.metrics.get("val_map"))  # a multi-label task: its val mAP
        prompts = info.prompt.get("num_prompts")
        method = info.prompt.get("method") + (f" ({prompts})" if get_method(info.prompt["method"]).prompts else "")
        table.add_row(safe(entry.name), method, safe(info.backbone), str(info.img_size), str(len(info.classes)),
                      f"{top1:.3f}" if top1 is not None else "-", size, safe(info.provenance.get("created", "-")))
    console.print(table)


def render_task_info(console: Console, path: Path, info: TaskInfo) -> None:
    prompt = info.prompt
    lines = [
        f"[bold]{safe(path.name.removesuffix('.safetensors'))}[/]  {safe(path)}",
        f"  method         {prompt.get('method')}" + (f", {prompt.get('num_prompts')} prompts" if prompt.get("num_prompts") else "")
        + (f", Fourier fraction {prompt['fourier_fraction']:g} (folded)"
           if prompt.get("fourier_fraction") is not None else ""),
        f"  backbone       {safe(info.backbone)} at {info.img_size} px (fingerprint {info.backbone_fingerprint[:12]})",
        f"  classes        {len(info.classes)}: {safe(', '.join(info.classes[:20]))}{' ...' if len(info.classes) > 20 else ''}",
        f"  val metrics    {safe(', '.join(f'{k} {v:.4g}' for k, v in info.metrics.items() if v is not None)) or '-'}",
        f"  trained        {safe(info.provenance.get('created', '-'))} on {safe(info.provenance.get('data', '-'))}",
    ]
    for line in lines:
        console.print(line, highlight=False)
