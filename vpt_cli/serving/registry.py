"""The task set a server answers, swapped whole: load, reload and unload task files on one backbone.

A `Snapshot` (a TaskServer and what each task file was when read) never changes once built; a
change builds a new one on the same backbone and replaces `LiveTasks.current` in one assignment.
A request keeps the snapshot it started with, so in-flight work finishes on its own version and
the batcher never mixes two versions in one forward. The backbone itself is loaded once: a task
trained on another backbone is refused with the reason, and the old set keeps serving.

Messages raised from here name tasks, never the server's file paths (they go to HTTP clients).
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vpt_cli.artifact.home import TASK_SUFFIX, check_task_name, resolve_task_path, task_name_from
from vpt_cli.artifact.schema import Task, TaskInfo, load_task
from vpt_cli.core.errors import TaskError, UsageError, VPTError
from vpt_cli.models.backbones import Backbone
from vpt_cli.serving.loading import load_for_inference
from vpt_cli.serving.tasks import TaskServer, server_for

# A file's identity for the watcher: (mtime in ns, size). A replaced file changes at least one.
Stamp = tuple[int, int]


class UnknownTask(TaskError):
    """No such task here: not served, or no file to load it from."""


@dataclass(frozen=True)
class ServedTask:
    """One loaded task file: its metadata, content hash and stamp when it was read."""

    name: str
    info: TaskInfo
    sha256: str
    stamp: Stamp
    task: Task = field(repr=False)


@dataclass(frozen=True)
class Snapshot:
    """One immutable version of the served set: the model and its tasks, in the model's order."""

    version: int
    server: TaskServer
    tasks: dict[str, ServedTask]


class LiveTasks:
    """The served set of tasks, changed only by whole-snapshot swaps (thread-safe).

    `folder` set: every task file in it is served (--all-tasks), and files added there are picked
    up by `poll`. Otherwise only the tasks named at start (names or files) are served and watched.
    """

    def __init__(self, tasks: Sequence[str | Path] = (), folder: Path | None = None,
                 backbone_weights: str | None = None, device: str = "auto") -> None:
        if not tasks and folder is None:
            raise UsageError("give at least one --task, or --all-tasks")
        self.folder = Path(folder) if folder is not None else None
        self._named = {task_name_from(resolve_task_path(task)): resolve_task_path(task) for task in tasks}
        if len(self._named) != len(tasks):
            raise UsageError("the same task was given twice")
        self._weights, self._device = backbone_weights, device
        self._lock = threading.Lock()
        self._seen: dict[str, Stamp] = {}  # each source file's stamp at the last look (loaded or refused)
        self.backbone: Backbone | None = None
        self.device: torch.device | None = None
        self.reference: TaskInfo | None = None
        self.current: Snapshot | None = None

    def sources(self) -> dict[str, Path]:
        """Task name -> the file it is served from: the named tasks, or every file of the folder."""
        if self.folder is None:
            return dict(self._named)
        return {path.name.removesuffix(TASK_SUFFIX): path for path in sorted(self.folder.glob(f"*{TASK_SUFFIX}"))
                if not path.name.startswith(".")}

    def load(self) -> list[str]:
        """Load the backbone (from the first task) and every source; returns a line per refused file."""
        sources = self.sources()
        if not sources:
            raise UsageError(f"no task files (*{TASK_SUFFIX}) in {self.folder}")
        first_name, first_path = next(iter(sources.items()))
        first = load_for_inference(first_path, self._weights, self._device)
        self.backbone, self.reference, self.device = first.backbone, first.task.info, first.device
        served, refused = {first_name: _served(first_name, first.task)}, []
        for name, path in list(sources.items())[1:]:
            try:
                candidate = _served(name, _read(name, path))
                server_for(self.backbone, first.device, [first.task, candidate.task], self.reference)
                served[name] = candidate
            except VPTError as exc:
                refused.append(f"refused task '{name}': {_public(exc, path, name)}")
        self._swap(served)
        self._seen = {name: stamp for name, path in sources.items() if (stamp := _stamp(path)) is not None}
        return refused

    def reload(self, name: str) -> ServedTask:
        """Load (or replace) task `name` from its file and swap it in; the old set stays on failure."""
        check_task_name(name)
        path = self.sources().get(name) or (self.folder / f"{name}{TASK_SUFFIX}" if self.folder else None)
        if path is None:
            raise UnknownTask(f"task '{name}' was not given at start, so this server cannot load it")
        with self._lock:
            try:
                candidate = _served(name, _read(name, path))
                tasks = {**self._snapshot().tasks, name: candidate}
                self._swap(tasks)
            except VPTError as exc:
                raise type(exc)(_public(exc, path, name)) from None
            return candidate

    def unload(self, name: str) -> None:
        """Stop serving `name` (its file is left alone); the last task cannot be unloaded."""
        with self._lock:
            tasks = dict(self._snapshot().tasks)
            if name not in tasks:
                raise UnknownTask(f"task '{name}' is not served")
            if len(tasks) == 1:
                raise UsageError(f"'{name}' is the only task served; load another before unloading it")
            del tasks[name]
            self._swap(tasks)

    def poll(self) -> list[str]:
        """Apply what changed on disk since the last look; one line per change.

        Only changes count: a file that is new or whose stamp moved is (re)loaded, a file that went
        away is unloaded. A task unloaded through the API stays unloaded until its file changes."""
        lines = []
        now = {name: stamp for name, path in self.sources().items() if (stamp := _stamp(path)) is not None}
        for name, stamp in now.items():
            if self._seen.get(name) == stamp:
                continue
            self._seen[name] = stamp
            verb = "reloaded" if name in self._snapshot().tasks else "loaded"
            try:
                self.reload(name)
                lines.append(f"{verb} task '{name}'")
            except VPTError as exc:
                lines.append(f"refused task '{name}': {exc}")
        for name in [name for name in self._seen if name not in now]:
            del self._seen[name]
            if name in self._snapshot().tasks:
                try:
                    self.unload(name)
                    lines.append(f"unloaded task '{name}' (its file is gone)")
                except (UsageError, UnknownTask) as exc:
                    lines.append(f"kept task '{name}': {exc}")
        return lines

    def _snapshot(self) -> Snapshot:
        if self.current is None:
            raise UsageError("tasks are not loaded yet")
        return self.current

    def _swap(self, tasks: dict[str, ServedTask]) -> None:
        """Build the new version's model on the shared backbone, then publish it in one assignment."""
        assert self.backbone is not None and self.device is not None
        server = server_for(self.backbone, self.device, [task.task for task in tasks.values()], self.reference)
        server.names = list(tasks)  # served under their registry names (file names), like `vpt tasks`
        version = self.current.version + 1 if self.current else 1
        self.current = Snapshot(version=version, server=server, tasks=dict(tasks))


def _read(name: str, path: Path) -> Task:
    if not path.is_file():
        raise UnknownTask(f"task '{name}' has no file to load")
    return load_task(path)


def _served(name: str, task: Task) -> ServedTask:
    assert task.path is not None
    data = task.path.read_bytes()
    stamp = _stamp(task.path)
    assert stamp is not None
    return ServedTask(name=name, info=task.info, sha256=hashlib.sha256(data).hexdigest(), stamp=stamp, task=task)


def _stamp(path: Path) -> Stamp | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _public(exc: BaseException, path: Path, name: str) -> str:
    """The error's message with the server's paths replaced by the task's name."""
    text = str(exc)
    for shown in (str(path.resolve()), str(path), str(path.parent)):
        text = text.replace(shown, f"task '{name}'" if shown != str(path.parent) else "the task folder")
    return text
