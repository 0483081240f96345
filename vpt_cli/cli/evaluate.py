"""vpt eval: score a task on labelled images and write its report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vpt_cli.cli.common import is_follower, launch_if_asked, make_reporter, out, path_text, print_json, run_command
from vpt_cli.cli.options import (
    DEVICE_HELP,
    JSON_HELP,
    QUIET_HELP,
    TASK_HELP,
    WEIGHTS_HELP,
    WORKERS_HELP,
    DataFormat,
    Device,
    DevicesOpt,
)


def evaluate(
    data: Path = typer.Argument(..., help="Folder of class folders to evaluate on (e.g. DATA/test), or any source "
                                "vpt train reads (with --split)."),
    task: str = typer.Option(..., "--task", "-t", help=TASK_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="Split to score: a folder DATA/<split>, or a list "
                                        "format's train/val/trainval/test. \\[default: DATA itself for folders; test, else val for lists]"),
    data_format: DataFormat = typer.Option(DataFormat.auto, "--data-format", help="How to read DATA."),
    label_sep: str = typer.Option(";", "--label-sep", help="Multi-label tasks: what separates a CSV cell's labels."),
    backbone_weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    device: Device = typer.Option(Device.auto, help=DEVICE_HELP),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="Mixed precision inference."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    output_dir: Optional[Path] = typer.Option(None, help="Folder for report.html, metrics.json, predictions.csv and the pictures. \\[default: runs/eval/<task>, numbered <task>2, ... instead of overwriting]"),
    devices: DevicesOpt = None,
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Evaluate a task: top-1/top-5, per-class precision/recall/F1, balanced accuracy, confusion matrix
    (multi-label tasks: mAP, micro/macro F1, exact match, Hamming loss, per-class AP/F1)."""

    def action() -> None:
        launch_if_asked(devices)  # before the library's imports: the launcher only starts the processes
        from vpt_cli import api

        result = api.evaluate(data, task, path_text(backbone_weights), batch_size, device.value, workers, amp,
                              output_dir, make_reporter(quiet), split=split, data_format=data_format.value,
                              label_sep=label_sep)
        if is_follower():
            return
        if as_json:
            print_json(result.to_dict())
            return
        from vpt_cli.cli.render import render_eval

        render_eval(out, result)

    run_command(action)
