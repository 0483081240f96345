"""vpt tasks: list, show, remove, rename and import the tasks in the registry."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vpt_cli.cli.common import err, out, print_json, run_command
from vpt_cli.cli.options import TASK_HELP, ForceOpt, JsonOpt
from vpt_cli.core.safetext import safe

tasks_app = typer.Typer(help="List and manage the task registry ($VPT_HOME/tasks). Without a subcommand: list.",
                        no_args_is_help=False)



def _task_row(entry: Any) -> dict[str, Any]:
    """One registry entry as JSON: the checked metadata's summary, or why the file is unusable."""
    row = {"name": entry.name, "path": str(entry.path), "size_bytes": entry.path.stat().st_size}
    if entry.info is None:
        return {**row, "error": entry.error}
    info = entry.info
    return {**row, "method": info.prompt.get("method"), "prompts": info.prompt.get("num_prompts"),
            "backbone": info.backbone, "img_size": info.img_size, "classes": info.classes,
            "metrics": info.metrics, "created": info.provenance.get("created")}



@tasks_app.callback(invoke_without_command=True)
def tasks(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the tasks in the registry: name, method, backbone, image size, classes, val top-1, size, created.

    Tasks answer together in one `vpt predict` only when backbone and image size match."""
    if ctx.invoked_subcommand is not None:
        return

    def action() -> None:
        from vpt_cli.artifact.home import tasks_dir
        from vpt_cli.artifact.registry import list_tasks

        entries = list_tasks()
        if as_json:
            print_json([_task_row(entry) for entry in entries])
            return
        from vpt_cli.cli.render import render_tasks

        render_tasks(out, entries, tasks_dir())

    run_command(action)



@tasks_app.command("show")
def tasks_show(name: Annotated[str, typer.Argument(help=TASK_HELP)], as_json: JsonOpt = False) -> None:
    """Everything a task file says about itself: backbone, prompts, classes, metrics, provenance."""

    def action() -> None:
        from dataclasses import asdict

        from vpt_cli.artifact.home import resolve_task_path
        from vpt_cli.artifact.schema import read_task_info

        path = resolve_task_path(name)
        info = read_task_info(path)
        payload = {"path": str(path), "size_bytes": path.stat().st_size, **asdict(info)}
        if as_json:
            print_json(payload)
            return
        from vpt_cli.cli.render import render_task_info

        render_task_info(out, path, info)

    run_command(action)



@tasks_app.command("rm")
def tasks_rm(name: Annotated[str, typer.Argument(help="Registry name of the task to delete.")]) -> None:
    """Delete a task from the registry (its run folder is kept)."""

    def action() -> None:
        from vpt_cli.artifact.registry import remove_task

        err.print(f"removed {safe(remove_task(name))}", highlight=False)

    run_command(action)



@tasks_app.command("mv")
def tasks_mv(old: Annotated[str, typer.Argument(help="Current registry name.")],
             new: Annotated[str, typer.Argument(help="New registry name.")], force: ForceOpt = False) -> None:
    """Rename a task in the registry (the registry name is the file name)."""

    def action() -> None:
        from vpt_cli.artifact.registry import rename_task

        err.print(f"renamed {safe(old)} -> {safe(rename_task(old, new, force=force))}", highlight=False)

    run_command(action)



@tasks_app.command("import")
def tasks_import(file: Annotated[Path, typer.Argument(help="A .safetensors task file, e.g. one you were sent.")],
                 name: Annotated[Optional[str], typer.Option("--name", "-n", help="Registry name. \\[default: the file's stem]")] = None,
                 force: ForceOpt = False) -> None:
    """Check a task file completely (metadata and tensors), then copy it into the registry."""

    def action() -> None:
        from vpt_cli.artifact.registry import import_task

        err.print(f"imported {safe(file)} -> {safe(import_task(file, name, force=force))}", highlight=False)

    run_command(action)
