"""vpt predict: the classes of images for one or more tasks, as a table, JSON or CSV."""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from vpt_cli.cli.common import (
    err,
    is_follower,
    launch_if_asked,
    make_reporter,
    out,
    path_text,
    run_command,
    write_output,
)
from vpt_cli.cli.options import (
    DEVICE_HELP,
    QUIET_HELP,
    TASK_HELP,
    WEIGHTS_HELP,
    WORKERS_HELP,
    Device,
    DevicesOpt,
    ForceOpt,
    OutputFormat,
)
from vpt_cli.core.errors import UsageError
from vpt_cli.core.fileio import strict_json
from vpt_cli.core.safetext import printable, safe


def _predictions_csv(result: Any) -> str:
    """One row per (image, task, rank); the columns never change with the number of tasks."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "task", "rank", "class", "prob"])
    for prediction in result.predictions:
        for rank, (name, prob) in enumerate(prediction.top, 1):
            writer.writerow([printable(prediction.file), prediction.task, rank, printable(name), f"{prob:.6f}"])
    return buffer.getvalue()



def predict(
    images: Optional[List[str]] = typer.Argument(None, help="Image files, folders (searched recursively) or glob patterns."),
    task: List[str] = typer.Option([], "--task", "-t", help=TASK_HELP + " Repeat to answer several tasks for every image in shared batches (same backbone)."),
    tasks_from: Optional[Path] = typer.Option(None, "--tasks-from", help="CSV with 'image' and 'task' columns: which tasks to answer for which image (instead of IMAGES and --task); image paths are relative to the CSV."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Classes to show per image and task, the best scores whatever they are. \\[default: 3; multi-label tasks: every class over its threshold]"),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, json or csv (columns file,task,rank,class,prob; one row per class shown, so a multi-label image with no class over its threshold has none)."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the predictions to this file instead of stdout (json or csv: --format, else the file's suffix)."),
    save_dir: Optional[Path] = typer.Option(None, "--save-dir", help="Also write each image with its top-k labels drawn above it (PNG) into this folder."),
    force: ForceOpt = False,
    backbone_weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    batch_size: Optional[int] = typer.Option(None, help="(image, task) pairs per forward pass. \\[default: auto]"),
    device: Device = typer.Option(Device.auto, help=DEVICE_HELP),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="Mixed precision inference."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    devices: DevicesOpt = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Predict the classes of images for one or more tasks. Exits non-zero only if no input could be read.

    Example: [bold]vpt predict photos/ --task birds --task cars --format csv[/]
    """

    def action() -> None:
        launch_if_asked(devices)  # before the library's imports: the launcher only starts the processes
        from vpt_cli import api

        if tasks_from is None and not (images and task):
            raise UsageError("give IMAGES and at least one --task, or --tasks-from FILE.csv")
        if batch_size is not None and batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        fmt = OutputFormat.json if as_json else output_format
        if output is not None and fmt is OutputFormat.table:
            fmt = OutputFormat.json if output.suffix.lower() == ".json" else OutputFormat.csv
        if output is not None and output.exists() and not force:
            raise UsageError(f"{output} exists; pass --force to overwrite it")
        result = api.predict(images or [], task, top_k, path_text(backbone_weights), batch_size, device.value, workers, amp,
                             make_reporter(quiet or fmt is not OutputFormat.table), tasks_from=tasks_from)
        if is_follower():
            return
        for file, reason in result.failures:
            err.print(f"[yellow]skipped[/] {safe(file)}: {safe(reason)}", highlight=False)
        several = len(result.tasks) > 1
        if fmt is OutputFormat.table:
            from vpt_cli.cli.render import render_predictions

            render_predictions(out, result)
        else:
            text = strict_json(result.to_dict()) if fmt is OutputFormat.json else _predictions_csv(result)
            if output is None:
                sys.stdout.write(text)
            else:
                write_output(output, text)
        if save_dir is not None:
            written = api.save_labelled_images(result, save_dir, force=force)
            err.print(f"{len(written)} labelled images in {safe(save_dir)}", highlight=False)
        if not quiet:
            tasks_note = f" x {len(result.tasks)} tasks ({len(result.predictions)} answers)" if several else ""
            err.print(f"{result.num_images} images{tasks_note}, {result.images_per_sec:.1f} img/s", highlight=False)

    run_command(action)
