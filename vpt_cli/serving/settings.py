"""What `vpt serve` is told (the CLI's flags as one value), with the bounds every limit must keep."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vpt_cli.core.errors import UsageError
from vpt_cli.serving.batcher import BATCHING


@dataclass
class ServeSettings:
    """Everything `vpt serve` is told; the defaults are the CLI's."""

    tasks: list[str] = field(default_factory=list)
    all_tasks_dir: Optional[Path] = None  # serve every task file in this folder
    backbone_weights: Optional[str] = None
    device: str = "auto"
    amp: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: Optional[int] = None  # None: TaskServer.auto_batch_size()
    max_wait_ms: float = 5.0
    max_queue: int = 512
    timeout_s: float = 30.0
    max_body_mb: float = 20.0
    max_images: int = 32
    api_key: Optional[str] = None
    cors_origins: list[str] = field(default_factory=list)
    watch: bool = False
    watch_interval_s: float = 2.0
    access_log: bool = False
    workers: int = 4  # decode threads
    drain_timeout_s: float = 10.0
    batching: str = "cross-task"

    def check(self) -> None:
        """Refuse values that would make a limit meaningless, in one line each."""
        bounds = [("--max-batch", self.max_batch is None or self.max_batch >= 1, "at least 1"),
                  ("--max-wait-ms", 0 <= self.max_wait_ms <= 1000, "between 0 and 1000"),
                  ("--max-queue", self.max_queue >= 1, "at least 1"),
                  ("--timeout-s", self.timeout_s > 0, "positive"),
                  ("--max-body-mb", 0 < self.max_body_mb <= 1024, "between 0 and 1024"),
                  ("--max-images", 1 <= self.max_images <= 1024, "between 1 and 1024"),
                  ("--watch-interval-s", 0.1 <= self.watch_interval_s <= 3600, "between 0.1 and 3600"),
                  ("--workers", 1 <= self.workers <= 64, "between 1 and 64"),
                  ("--drain-timeout", self.drain_timeout_s >= 0, "not negative"),
                  ("--port", 0 <= self.port <= 65535, "between 0 and 65535")]
        for flag, ok, rule in bounds:
            if not ok:
                raise UsageError(f"{flag} must be {rule}")
        if self.batching not in BATCHING:
            raise UsageError(f"--batching must be one of {', '.join(BATCHING)}")
