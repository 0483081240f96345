"""vpt serve: one backbone answering every loaded task over HTTP, with cross-task dynamic batching."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from vpt_cli.cli.common import err, path_text, run_command
from vpt_cli.cli.options import DEVICE_HELP, TASK_HELP, WEIGHTS_HELP, Device, choices
from vpt_cli.core.errors import UsageError
from vpt_cli.core.safetext import safe

Batching = choices("Batching", ("cross-task", "per-task", "none"))


def serve(
    task: List[str] = typer.Option([], "--task", "-t", help=TASK_HELP + " Repeat to serve several tasks on their shared backbone."),
    all_tasks: bool = typer.Option(False, "--all-tasks", help="Serve every task file of the registry (or --tasks-dir) that shares the first one's backbone; the others are refused with the reason."),
    tasks_dir: Optional[Path] = typer.Option(None, "--tasks-dir", help="With --all-tasks: the folder of task files to serve. \\[default: $VPT_HOME/tasks]"),
    watch: bool = typer.Option(False, "--watch", help="Reload when task files are added, replaced or removed (checked every --watch-interval-s; swapped between batches)."),
    watch_interval_s: float = typer.Option(2.0, "--watch-interval-s", help="Seconds between two looks at the task files (0.1 to 3600)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs --api-key (or --insecure-no-key)."),
    port: int = typer.Option(8000, "--port", help="Port; 0 picks a free one (shown on the ready line)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="VPT_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on every route but /v2/health/* and the page."),
    insecure_no_key: bool = typer.Option(False, "--insecure-no-key", help="Allow a non-loopback --host without a key (only behind something that checks callers)."),
    cors_origin: List[str] = typer.Option([], "--cors-origin", help="Allow browser calls from this origin (repeat); CORS is off without it."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="(image, task) pairs per forward. \\[default: auto for the device]"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="Longest a batch waits for more pairs after its first one."),
    max_queue: int = typer.Option(512, "--max-queue", help="Pairs that may wait for a forward; past it requests get 503 with Retry-After."),
    timeout_s: float = typer.Option(30.0, "--timeout-s", help="Per-request limit; past it the answer is 504."),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", help="Largest request body (413), checked while it streams in."),
    max_images: int = typer.Option(32, "--max-images", help="Most images in one request (413)."),
    drain_timeout: float = typer.Option(10.0, "--drain-timeout", help="On SIGTERM/SIGINT: seconds to finish the requests already accepted."),
    access_log: bool = typer.Option(False, "--access-log", help="Log one line per request on stderr."),
    backbone_weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    device: Device = typer.Option(Device.auto, help=DEVICE_HELP),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="Mixed precision inference."),
    workers: int = typer.Option(4, "--workers", help="Threads decoding and transforming images."),
    batching: Batching = typer.Option(Batching("cross-task"), "--batching", hidden=True, help="cross-task (default), per-task (a batch holds one task) or none: for comparisons."),
) -> None:
    """Serve tasks over HTTP: POST /v1/predict, KServe v2 routes, /metrics, /docs and a web page at /.

    Requests for any loaded tasks share batched forwards of the one backbone. Loopback only
    unless a key is set. SIGTERM or Ctrl-C answer what was accepted, then exit 0.

    Examples:

      [bold]vpt serve --task birds --task cars[/]

      [bold]curl -F image=@bird.jpg -F task=birds localhost:8000/v1/predict[/]

      [bold]VPT_API_KEY=secret vpt serve --all-tasks --watch --host 0.0.0.0[/]
    """

    def action() -> None:
        # Straight to the serving layer, not through vpt_cli.api: api imports the training and
        # evaluation stack, which a server (often a fresh container) would load for nothing.
        from vpt_cli.artifact.home import tasks_dir as registry_dir
        from vpt_cli.serving.runner import serve as run_server
        from vpt_cli.serving.settings import ServeSettings

        if all_tasks == bool(task):
            raise UsageError("give --task (repeatable) or --all-tasks")
        if tasks_dir is not None and not all_tasks:
            raise UsageError("--tasks-dir goes with --all-tasks")
        folder = (tasks_dir or registry_dir()) if all_tasks else None
        if folder is not None and not folder.is_dir():
            raise UsageError(f"no task folder at {folder}")
        settings = ServeSettings(
            tasks=list(task), all_tasks_dir=folder, backbone_weights=path_text(backbone_weights), device=device.value,
            amp=amp, host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
            timeout_s=timeout_s, max_body_mb=max_body_mb, max_images=max_images, api_key=api_key or None,
            cors_origins=list(cors_origin), watch=watch, watch_interval_s=watch_interval_s, access_log=access_log,
            workers=workers, drain_timeout_s=drain_timeout, batching=_value(batching))
        run_server(settings, insecure_no_key=insecure_no_key,
                   on_ready=lambda line: err.print(safe(line), highlight=False, soft_wrap=True))
        err.print("stopped", highlight=False)

    run_command(action)


def _value(choice: Enum) -> str:
    return str(choice.value)
