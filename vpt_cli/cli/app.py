"""The `vpt` command: a thin Typer layer over vpt_cli.api.

Each command parses its options, calls one library function and renders the result with rich
(or prints it as JSON). torch is imported only inside commands so `vpt --help` starts fast.
Errors the user can fix end with one line on stderr and a documented exit code.
"""
from __future__ import annotations

import typer
import typer.core

from vpt_cli import __version__
from vpt_cli.cli import evaluate, export, predict, serve, tasks, train
from vpt_cli.cli.common import out


def _flags_read_as_flags() -> None:
    """Typer's rich help prints a type after every option, `<bool>` for flags too, which reads as
    if --json or --help took a value: show no type for flags (options that take one keep it)."""
    shown = typer.core.TyperOption.display_type_rich

    def display_type_rich(self: typer.core.TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    typer.core.TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_read_as_flags()

app = typer.Typer(
    name="vpt",
    help="Visual Prompt Tuning for pretrained Vision Transformers: train a tiny task on a folder of "
    "images, then evaluate, predict and export it. A task is a few prompt tokens and a linear head "
    "on a frozen timm backbone.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        out.print(f"vpt-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Show the version and exit.")) -> None:
    """Visual Prompt Tuning for pretrained Vision Transformers."""


app.command()(train.train)
app.command()(train.sweep)
app.command("eval")(evaluate.evaluate)
app.command()(predict.predict)
app.command()(export.export)
app.command()(serve.serve)
app.add_typer(tasks.tasks_app, name="tasks")


