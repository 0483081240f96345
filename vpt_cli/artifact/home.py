"""$VPT_HOME: the task registry, task names and per-task locks.

Every path written here is built from a name the user typed (or a task file's stem), checked
against one safe alphabet, so nothing a task file says can steer a write outside $VPT_HOME.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from hashlib import blake2b
from pathlib import Path
from typing import Iterator

from vpt_cli.core.errors import TaskError, UsageError

TASK_SUFFIX = ".safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FRESH_LOCK_SECONDS = 10.0
NAME_RULE = "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64"


def vpt_home() -> Path:
    """$VPT_HOME, else the platform's per-user data folder (XDG on Linux)."""
    if os.environ.get("VPT_HOME"):
        return Path(os.environ["VPT_HOME"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "vpt"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "vpt"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "vpt"


def tasks_dir() -> Path:
    return vpt_home() / "tasks"


def check_task_name(name: str) -> str:
    """`name` if it is a valid task name, else a UsageError (exit 2) saying what is allowed."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise UsageError(f"invalid task name {name!r}: use {NAME_RULE}")
    return name


def slugify(text: str) -> str:
    """A valid task name made from any text (a folder name): unsafe runs become '-'."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).lstrip("._-")[:64].rstrip("-")
    return slug or "task"


def is_task_path(name_or_path: str | Path) -> bool:
    """`--task` is a file path when it ends in .safetensors or names a folder; else a registry name."""
    text = str(name_or_path)
    return text.endswith(TASK_SUFFIX) or os.sep in text or "/" in text


def resolve_task_path(name_or_path: str | Path) -> Path:
    """`--task` accepts a registry name ('birds') or a path to a task file (*.safetensors)."""
    text = str(name_or_path)
    if is_task_path(text):
        if not text.endswith(TASK_SUFFIX):
            raise UsageError(f"a task file path must end in {TASK_SUFFIX}, not {text!r}")
        path = Path(text).expanduser()
        check_task_name(path.name[: -len(TASK_SUFFIX)])
        return path
    return tasks_dir() / f"{check_task_name(text)}{TASK_SUFFIX}"


def task_name_from(name_or_path: str | Path) -> str:
    """The registry-style name of a task given by name or path (the file's stem), checked."""
    return check_task_name(Path(str(name_or_path)).name.removesuffix(TASK_SUFFIX))


def remove_orphan_temp_files(path: Path) -> int:
    """Delete `.NAME.*.tmp` files that a killed writer of `path` left beside it; returns how many.

    Call only while holding the task's lock: then no live writer owns them."""
    removed = 0
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):
        orphan.unlink(missing_ok=True)
        removed += 1
    return removed


@contextmanager
def task_lock(task_path: Path) -> Iterator[None]:
    """Hold the per-task lock in $VPT_HOME/locks for the block: a second writer of the same task
    fails at once naming the holder; a lock left by a dead process is taken over."""
    key = blake2b(str(Path(task_path).resolve()).encode(), digest_size=8).hexdigest()
    lock = vpt_home() / "locks" / f"{Path(task_path).name}.{key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None and _age(lock) < _FRESH_LOCK_SECONDS:  # its writer is still filling it in
                holder = {"pid": "?", "host": "this machine", "started": "just now"}
            if holder is not None and _alive(holder):
                raise TaskError(f"task '{Path(task_path).name}' is being trained by pid {holder.get('pid')} on "
                                f"{holder.get('host')} since {holder.get('started')}; wait for it or stop it") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    else:
        raise TaskError(f"cannot take the lock {lock} (another process keeps recreating it)")
    try:
        yield
    finally:
        if _read_lock(lock) == me:
            lock.unlink(missing_ok=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _read_lock(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs (another host's lock is assumed alive)."""
    if holder.get("host") not in (socket.gethostname(), "this machine"):
        return True
    if holder.get("pid") == "?":
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
