"""What every command shares: the consoles, the one-line error handling and exit codes, the reporter, JSON output and the --devices relaunch."""
from __future__ import annotations

import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer
from rich.console import Console

from vpt_cli.core.errors import Terminated, UsageError, VPTError, one_line
from vpt_cli.core.fileio import strict_json
from vpt_cli.core.safetext import safe

if TYPE_CHECKING:
    from vpt_cli.runtime.reporting import EpochStats


out = Console()



err = Console(stderr=True)



_PIPE_WIDTH = 10_000



def run_command(action: Callable[[], Any]) -> Any:
    """Call `action`; turn user-facing errors into one stderr line and their exit code.

    SIGTERM is turned into `Terminated` (a KeyboardInterrupt) for the call, so training stops
    and says what it saved exactly as on Ctrl-C, then exits 143."""
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    for console in (out, err):  # piped or redirected: full lines, never wrapped or cut at 80 columns
        console.width = None if console.is_terminal else _PIPE_WIDTH
    try:
        return action()
    except VPTError as exc:
        if _reports(exc):
            err.print(f"[bold red]error:[/] {safe(one_line(exc, 1000))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        if _reports(exc):
            err.print("[bold red]interrupted[/]" + (" (SIGTERM)" if isinstance(exc, Terminated) else ""))
        raise typer.Exit(getattr(exc, "exit_code", 130)) from None
    except typer.Exit:  # the --devices launcher's exit code
        raise
    except Exception as exc:
        if os.environ.get("VPT_DEBUG"):
            raise
        from vpt_cli.cli.launch import leave_for_launcher

        if leave_for_launcher(exc):
            raise typer.Exit(1) from None
        where = f"rank {os.environ['RANK']}: " if is_follower() else ""
        err.print(f"[bold red]{where}internal error:[/] {type(exc).__name__}: {safe(one_line(exc, 300))} "
                  "(set VPT_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)



def is_follower() -> bool:
    """A torchrun process other than rank 0: it computes its share; rank 0 reports and writes."""
    return os.environ.get("RANK", "0") != "0"



def _reports(exc: BaseException) -> bool:
    """Whether this process prints `exc`'s line: errors every process shares are rank 0's to say,
    and a SIGTERM the --devices launcher sent is the launcher's (it says which process died)."""
    stopped = isinstance(exc, Terminated) or getattr(exc, "exit_code", None) == Terminated.exit_code
    return not is_follower() and not (stopped and os.environ.get("VPT_LAUNCHED"))



def launch_if_asked(devices: Optional[str]) -> None:
    """With --devices, run this command under torchrun instead (vpt_cli.cli.launch) and exit with its code."""
    if devices is not None:
        from vpt_cli.cli.launch import launch

        raise typer.Exit(launch(devices, sys.argv[1:]))



def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()



def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()



def make_reporter(quiet: bool):
    from vpt_cli.cli.progress import RichReporter

    return RichReporter(err, quiet=quiet, on_epoch=None if quiet else _print_epoch)



def _print_epoch(stats: "EpochStats") -> None:
    if stats.epoch == 1:
        err.print("[dim]each line: train loss and accuracy, val accuracy (* = the weights kept so far), lr, speed[/]")
    val = f"{stats.val_acc:.3f}" if stats.val_acc is not None else "  -  "
    mark = " [green]*[/]" if stats.is_best else ""
    err.print(
        f"epoch {stats.epoch:>3}/{stats.epochs}  loss {stats.train_loss:.4f}  train {stats.train_acc:.3f}  "
        f"val {val}{mark}  lr {stats.lr:.2e}  {stats.images_per_sec:.1f} img/s  {stats.seconds:.1f}s",
        highlight=False,
    )



def choice_value(choice: Optional[Enum]) -> Optional[str]:
    return choice.value if choice else None



def print_json(payload: Any) -> None:
    sys.stdout.write(strict_json(payload))



def write_output(path: Path, text: str) -> None:
    from vpt_cli.core.fileio import write_text

    try:
        write_text(path, text)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None



def path_text(value: Optional[Path]) -> Optional[str]:
    return str(value) if value else None
