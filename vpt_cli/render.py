"""Human-readable rendering of library results with rich (the CLI's non-JSON output)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vpt_cli.api import EvalResult, PredictResult, TrainResult


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def render_train(console: Console, result: TrainResult) -> None:
    report = result.val_report
    ratio = result.task_bytes / max(result.backbone_bytes, 1)
    lines = [
        f"[green]saved[/] task [bold]{result.task_name}[/] -> {result.task_path}",
        f"  classes        {len(result.classes)} ({', '.join(result.classes[:8])}{', ...' if len(result.classes) > 8 else ''})",
        f"  images         {result.num_train} train, {result.num_val} val"
        + (f", {len(result.skipped)} skipped (see {result.run_dir / 'skipped.txt'})" if result.skipped else ""),
        f"  val top-1      {_pct(report.top1 if report else None)} (best epoch {result.best_epoch}"
        + (", stopped early" if result.stopped_early else "") + ")",
        f"  linear probe   {_pct(result.probe_val_acc)} val top-1 before prompt training",
        f"  task file      {result.task_bytes / 1e3:.1f} KB = {100 * ratio:.3f}% of the backbone "
        f"({result.backbone_bytes / 1e6:.1f} MB); {result.trainable_params:,} trained parameters",
        f"  speed          {result.train_images_per_sec:.1f} train img/s, {result.seconds:.0f}s in all",
        f"  run folder     {result.run_dir} (config.yaml, history.png, last.safetensors)",
    ]
    for line in lines:
        console.print(line, highlight=False)


def render_eval(console: Console, result: EvalResult) -> None:
    report = result.report
    table = Table(title=f"{result.task_name}: per-class metrics", title_justify="left")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in report.per_class:
        table.add_row(row.name, f"{row.precision:.3f}", f"{row.recall:.3f}", f"{row.f1:.3f}", str(row.support))
    console.print(table)
    console.print(
        f"top-1 {_pct(report.top1)}  top-5 {_pct(report.top5)}  balanced acc {_pct(report.balanced_accuracy)}  "
        f"macro F1 {report.macro_f1:.3f}  on {report.num_samples} images", highlight=False)
    if result.unknown_classes:
        console.print(f"[yellow]not evaluated[/]: folders unknown to the task: {', '.join(result.unknown_classes)}",
                      highlight=False)
    if result.skipped:
        console.print(f"[yellow]skipped[/] {len(result.skipped)} unreadable files", highlight=False)
    console.print(f"confusion matrix: {result.confusion_csv}  {result.confusion_png}", highlight=False)


def render_predictions(console: Console, result: PredictResult) -> None:
    several = len(result.tasks) > 1
    k = max((len(p.top) for p in result.predictions), default=1)
    table = Table(title=f"{', '.join(result.tasks)}: predictions", title_justify="left")
    table.add_column("image")
    if several:
        table.add_column("task")
    for rank in range(1, k + 1):
        table.add_column(f"#{rank}")
    for prediction in result.predictions:
        table.add_row(prediction.file, *([prediction.task] if several else []),
                      *[f"{name} [dim]{prob:.2f}[/]" for name, prob in prediction.top])
    console.print(table)
