"""What both benchmark scripts share: where the weights are, the machine line, markdown tables,
and rewriting only their own marked section of docs/benchmarks.md (other sections belong to
other scripts and are left byte for byte)."""
from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from vpt_cli.core.fileio import atomic_write

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
DEFAULT_WEIGHTS = ROOT.parent / "shared" / "assets" / "dinov2_vits14.safetensors"


PAGE = os.sysconf("SC_PAGE_SIZE")
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def pin_malloc() -> None:
    """Re-exec once with glibc's mmap threshold fixed at 64 KiB, before torch is imported.

    Large tensors then live in their own mappings and leave the resident set when freed, so the
    resident-set peak of one method is not hidden by the high-water mark of an earlier one.
    """
    if MMAP_ENV not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, MMAP_ENV: "65536"})


class PeakRSS:
    """Highest resident set size seen by a sampling thread while the block runs, minus the start."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.0005)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def machine_line() -> str:
    """Machine, date and the exact command, so a table can be traced and rerun."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]  # other processes on the machine skew timings: say how busy it was
    return (f"Measured {date} on {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}, load average {load:.1f} at the end. "
            f"Command: `{command}`")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, doc: Path = DOC) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->`; append them if absent."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n## {title}\n\n{body}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nTables below are written by the scripts named in them.\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + f"\n\n{block}\n"
    atomic_write(doc, lambda tmp: tmp.write_text(text))
