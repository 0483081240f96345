"""`--devices`: run this same command under torchrun, one process per device, so a user never
writes the torchrun line for a single machine (as Ultralytics does).

The launcher is torch's own elastic agent (what `torchrun --standalone` runs); its log lines are
silenced and its failure report becomes one line with a documented exit code.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

from vpt_cli.core.errors import UsageError, VPTError, one_line

# Exit codes a vpt process ends with after printing its own line (README, "Exit codes").
REPORTED_CODES = frozenset({2, 3, 4, 5, 6, 7, 130, 143})
LAUNCHED_ENV = "VPT_LAUNCHED"  # set in the processes the launcher starts


class ProcessDied(VPTError):
    """A process of a `--devices` job ended without saying why (killed, out of memory, a crash)."""


def parse_devices(spec: str) -> tuple[int, str | None]:
    """'0,1' -> (2, '0,1'): those GPUs ('3,' is GPU 3 alone); '4' -> (4, None): the first 4 GPUs;
    'cpu:2' -> (2, 'cpu'): 2 processes on the CPU."""
    text = spec.strip().lower()
    try:
        if text.startswith("cpu:"):
            count, where = int(text[4:]), "cpu"
        elif "," in text:
            ids = [int(item) for item in text.split(",") if item.strip()]
            if len(set(ids)) != len(ids) or min(ids) < 0:
                raise ValueError
            count, where = len(ids), ",".join(map(str, ids))
        else:
            count, where = int(text), None
    except ValueError:
        raise UsageError(f"--devices takes GPU ids (0,1), a GPU count (4) or cpu:N, not '{spec}'") from None
    if count < 1:
        raise UsageError(f"--devices {spec} asks for no process (GPU 0 alone is --devices 0,)")
    return count, where


def check_gpus(spec: str, count: int, where: str | None) -> None:
    """A GPU request this machine cannot meet is a usage error, before anything starts."""
    import torch

    if where == "cpu":
        return
    available = torch.cuda.device_count()
    needed = max(map(int, where.split(","))) + 1 if where else count
    if needed > available:
        raise UsageError(f"--devices {spec} needs {needed} GPUs; this machine has {available}"
                         + ("" if available else " (cpu:N runs N CPU processes)"))


def without_devices(argv: list[str]) -> list[str]:
    """The command line less its `--devices X` / `--devices=X`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            kept.append(arg)
    return kept


def launch(spec: str, argv: list[str]) -> int:
    """Run `python -m vpt_cli <argv without --devices>` in one process per requested device and
    return the job's exit code. A process that dies unannounced ends the job with one line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    count, where = parse_devices(spec)
    check_gpus(spec, count, where)
    if where not in (None, "cpu"):
        os.environ["CUDA_VISIBLE_DEVICES"] = where
    if where == "cpu":  # the cores are shared out, not oversubscribed N times (as torchrun does)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    os.environ[LAUNCHED_ENV] = "1"
    args = without_devices(argv) + ["--device", "cpu" if where == "cpu" else "cuda"]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count, run_id=f"vpt-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    _silence_torch_logs()
    try:
        elastic_launch(config, sys.executable)("-m", "vpt_cli", *args)
    except SignalException as exc:
        if exc.sigval == signal.SIGINT:
            return 130  # every process saw the Ctrl-C and rank 0 said what it saved
        raise ProcessDied(f"stopped by {exc.sigval.name}: finished epochs are saved in the run folder's "
                          "checkpoint; continue with --resume") from None
    except ChildFailedError as exc:
        rank, failure = root_cause(exc.failures)
        if failure.exitcode in REPORTED_CODES:
            return failure.exitcode
        how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"failed: {failure.message} (set VPT_DEBUG=1 for the traceback)")
        raise ProcessDied(f"process {rank} of {count} {how}, which ended the job; finished epochs are saved in "
                          "the run folder's checkpoint: continue with --resume") from None
    return 0


def root_cause(failures: dict[int, Any]) -> tuple[int, Any]:
    """The process that ended the job. One killed by a signal (out of memory, kill -9) is the
    cause: the others then fail in their next collective or are stopped by the agent (SIGTERM,
    handled: 143, or not yet: -15). Otherwise the earliest failure that is not such a stop, the
    lowest rank on a tie."""
    stopped = {143, -signal.SIGTERM}
    ranked = sorted(failures.items())
    killed = [item for item in ranked if item[1].exitcode < 0 and item[1].exitcode not in stopped]
    own = [item for item in ranked if item[1].exitcode not in stopped]
    return killed[0] if killed else min(own or ranked, key=lambda item: item[1].timestamp)


def leave_for_launcher(exc: BaseException) -> bool:
    """In a process the launcher started, hand an unexpected error to it (torch's per-process
    error file) instead of printing: it may only be the echo of another process's death, and the
    launcher says in one line which process ended the job. False elsewhere."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (os.environ.get(LAUNCHED_ENV) and path):
        return False
    message = f"{type(exc).__name__}: {one_line(exc, 300)}"
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"message": message, "timestamp": int(time.time())}, handle)
    return True


def _silence_torch_logs() -> None:
    """The elastic agent logs every start and stop; the launcher reports in one line instead."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
