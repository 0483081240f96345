"""A rich progress bar behind the engine's Reporter interface (stderr only)."""
from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vpt_cli.core.safetext import safe
from vpt_cli.runtime.reporting import EpochStats, Reporter


class RichReporter(Reporter):
    """One transient bar per unit of work (epoch, evaluation pass); epoch lines via `on_epoch`."""

    def __init__(self, console: Console, quiet: bool = False,
                 on_epoch: Callable[[EpochStats], None] | None = None):
        self.console = console
        self.quiet = quiet
        self.on_epoch = on_epoch
        self.progress: Progress | None = None
        self.task_id = None

    def start(self, description: str, total: int | None) -> None:
        if self.quiet or not self.console.is_terminal:  # bars only where they redraw in place
            return
        self.finish()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("images"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        self.progress.start()
        self.task_id = self.progress.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task_id, steps)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def epoch_end(self, stats: EpochStats) -> None:
        if self.on_epoch:
            self.on_epoch(stats)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]{safe(message)}[/]", highlight=False)
