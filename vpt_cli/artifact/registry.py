"""The task registry under $VPT_HOME/tasks: list (reading headers only), import, remove and rename task files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpt_cli.artifact.home import TASK_SUFFIX, check_task_name, task_lock, tasks_dir
from vpt_cli.artifact.schema import TaskInfo, load_task, read_task_info
from vpt_cli.core.errors import TaskError
from vpt_cli.core.fileio import write_bytes


@dataclass
class TaskEntry:
    """One file of the registry: its checked metadata, or why it cannot be used."""

    path: Path
    info: TaskInfo | None
    error: str | None = None

    @property
    def name(self) -> str:
        """The registry name: the file name, whatever the metadata says."""
        return self.path.name.removesuffix(TASK_SUFFIX)



def list_tasks() -> list[TaskEntry]:
    """Every task file in the registry by name; a bad one is listed with its error, not fatal."""
    entries = []
    for path in sorted(tasks_dir().glob(f"*{TASK_SUFFIX}")):
        try:
            entries.append(TaskEntry(path, read_task_info(path)))
        except TaskError as exc:
            entries.append(TaskEntry(path, None, str(exc).removeprefix(f"{path} ")))
    return entries



def import_task(source: Path, name: str | None = None, force: bool = False) -> Path:
    """Copy a task file into the registry under `name` (default: the file's stem), after checking
    all of it (metadata and tensors) like any load; the copy is written atomically."""
    source = Path(source)
    load_task(source)  # refuses anything a load would refuse, before the registry sees it
    target = tasks_dir() / f"{check_task_name(name if name is not None else source.name.removesuffix(TASK_SUFFIX))}{TASK_SUFFIX}"
    with task_lock(target):
        if target.exists() and not force:
            raise TaskError(f"task '{target.stem}' already exists; pass --force to replace it")
        write_bytes(target, source.read_bytes())
    return target



def remove_task(name: str) -> Path:
    """Delete a registry task (its run folder stays); a task being trained is not removed."""
    path = _registry_task(name)
    with task_lock(path):
        path.unlink()
    return path



def rename_task(old: str, new: str, force: bool = False) -> Path:
    """Rename a registry task; the name is the file name, so the metadata is left as it is."""
    source, target = _registry_task(old), tasks_dir() / f"{check_task_name(new)}{TASK_SUFFIX}"
    with task_lock(source), task_lock(target):
        if target.exists() and not force:
            raise TaskError(f"task '{new}' already exists; pass --force to replace it")
        source.replace(target)
    return target



def _registry_task(name: str) -> Path:
    path = tasks_dir() / f"{check_task_name(name)}{TASK_SUFFIX}"
    if not path.is_file():
        raise TaskError(f"no task '{name}' in {tasks_dir()} (see `vpt tasks`)")
    return path
