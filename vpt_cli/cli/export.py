"""vpt export: a task (or a multi-task bundle) as ONNX or TorchScript."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vpt_cli.cli.common import out, path_text, print_json, run_command
from vpt_cli.cli.options import JSON_HELP, TASK_HELP, WEIGHTS_HELP, ExportFormat
from vpt_cli.core.safetext import safe


def export(
    task: List[str] = typer.Option(..., "--task", "-t", help=TASK_HELP + " Repeat for a multi-task bundle (inputs images + task_index)."),
    output_format: ExportFormat = typer.Option(ExportFormat.onnx, "--format", "-f", help="onnx (dynamic batch) or torchscript."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write. \\[default: <task>.onnx or <task>.pt in the current folder]"),
    backbone_weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    dynamic_size: bool = typer.Option(False, "--dynamic-size", help="ONNX input of any height and width (multiples of the patch size; plain ViT backbones): position embeddings are resampled in the graph."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Export backbone + prompts + head as one file, checked against the eager model (max diff 1e-4).

    With several --task options, one bundle serves them all: the backbone once, every task's
    prompts and heads stacked, and a second input `task_index` (int64, one per image).
    """

    def action() -> None:
        from vpt_cli import api

        result = api.export(task, output_format.value, output, path_text(backbone_weights), dynamic_size=dynamic_size)
        payload = {"path": str(result.path), "format": result.format, "tasks": task,
                   "max_abs_diff": result.max_abs_diff, "checked_with": result.checked_with,
                   "size_bytes": result.size_bytes}
        if as_json:
            print_json(payload)
            return
        diff = f"max |diff| {result.max_abs_diff:.2e}" if result.max_abs_diff is not None else "unchecked"
        out.print(f"[green]exported[/] {safe(result.path)} ({result.size_bytes / 1e6:.1f} MB, {result.format}; "
                  f"{diff} vs eager, {result.checked_with})", highlight=False)

    run_command(action)
