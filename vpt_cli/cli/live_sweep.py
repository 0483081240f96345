"""The sweep's live table on stderr: a SweepReporter for `vpt sweep` only, so that the other
commands' rendering never imports the sweep (and torch)."""
from __future__ import annotations

from rich.console import Console
from rich.live import Live

from vpt_cli.cli.render import sweep_table
from vpt_cli.core.safetext import safe
from vpt_cli.training.sweep import SweepReporter, Trial


class LiveSweepTable(SweepReporter):
    """The sweep table redrawn in place on stderr as trials advance (plain lines when quiet)."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.live = Live(console=console, auto_refresh=False, transient=False)

    def __enter__(self) -> "LiveSweepTable":
        if not self.quiet:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()

    def trials_changed(self, trials: list[Trial]) -> None:
        if not self.quiet:
            self.live.update(sweep_table(trials), refresh=True)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]{safe(message)}[/]", highlight=False)
