"""Where a run's files go: the run folder, and the task a run claims (locked, refused before any work when it would lose some)."""
from __future__ import annotations

import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vpt_cli.artifact.home import (
    check_task_name,
    remove_orphan_temp_files,
    resolve_task_path,
    slugify,
    task_lock,
    task_name_from,
)
from vpt_cli.config import RunConfig
from vpt_cli.core.errors import TaskError, UsageError
from vpt_cli.core.fileio import numbered_dir, write_text
from vpt_cli.runtime import distributed
from vpt_cli.training.resume import Checkpoint, check_same_settings, run_settings


@dataclass
class ClaimedTask:
    """The task a run will write, locked for the run: where it goes and what it is called."""

    path: Path
    name: str
    run_dir: Path
    scratch: Path  # decoded photos for this run (vpt_cli.data.cache), removed when it ends

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.run_dir / CHECKPOINT_FILE, task=str(self.path.resolve()))



CHECKPOINT_FILE = "checkpoint.safetensors"  # resumable state; best/last.safetensors are usable tasks



@dataclass
class RunFolder:
    """Where a run's files go: `project/name`, numbered (name2, ...) unless `exist_ok`."""

    project: str | Path = "runs/train"
    name: str | None = None  # default: the task's name
    exist_ok: bool = False
    tensorboard: bool = False  # also log every epoch's scalars there for TensorBoard (tensorboardX)



@contextmanager
def claim_task(config: RunConfig, task: str | None, force: bool, resume: bool = False,
               folder: RunFolder | None = None) -> Iterator[ClaimedTask]:
    """Resolve the task name (default: the data folder's name, slugified), take its lock, and
    refuse what would lose work, all before any data or weights are read: an existing task
    without `force` (also on `resume`: a finished task is not resumed), or a checkpoint made with
    other settings. Then make the run folder: a new numbered one, or on `resume` (or `exist_ok`)
    the folder itself. Temp files a killed writer left behind are removed under the lock. Under
    torchrun rank 0 alone locks, checks and makes the folder; the others get its answer. Every
    process gets its own scratch folder for decoded photos, removed when the run ends."""
    config.validate()
    folder = folder or RunFolder()
    path = resolve_task_path(task if task is not None else default_task_name(config.data.path))
    name = task_name_from(path)
    run_name = check_task_name(folder.name) if folder.name is not None else name
    exact = (Path(folder.project) / run_name).resolve()

    made: list[Path] = []  # folders this claim created, innermost last: removed again if nothing worth keeping ran

    def claim(held: ExitStack) -> Path:
        held.enter_context(task_lock(path))
        if path.exists() and not force:
            hint = "it is finished, so there is nothing to resume; " if resume else ""
            raise TaskError(f"task '{name}' already exists at {path}; {hint}pass --force to train it again")
        if resume:
            check_same_settings(Checkpoint(exact / CHECKPOINT_FILE).settings(), run_settings(config))
        remove_orphan_temp_files(path)
        new_parents = [p for p in reversed(exact.parent.parents) if not p.exists()] + (
            [] if exact.parent.exists() else [exact.parent])
        try:
            before = exact.exists()
            run_dir = numbered_dir(exact.parent, run_name, exist_ok=resume or folder.exist_ok).resolve()
            made.extend(new_parents + ([run_dir] if run_dir != exact or not before else []))
        except OSError as exc:
            raise UsageError(f"cannot make the run folder {exact}: {exc.strerror or exc}") from None
        for written in RUN_FILES:
            remove_orphan_temp_files(run_dir / written)
        return run_dir

    with ExitStack() as held:
        scratch = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="vpt-decoded-")))
        claimed = ClaimedTask(path=path, name=name, run_dir=distributed.from_main(lambda: claim(held)), scratch=scratch)
        try:
            yield claimed
        except BaseException:
            if not claimed.checkpoint.exists():  # refused or stopped before an epoch was saved: leave no trace
                _remove_made(made)
            raise



RUN_FILES = (CHECKPOINT_FILE, "best.safetensors", "last.safetensors", "args.yaml", "results.csv", "results.png",
             "skipped.txt", "sweep.csv")




def _remove_made(made: list[Path]) -> None:
    """Remove the run folder a failed claim made (only the run's own files in it) and the parents
    it made, innermost first, where they are empty."""
    for folder in reversed(made):
        for written in RUN_FILES:
            (folder / written).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            return  # something else is in it: keep it


def default_task_name(data: str | Path) -> str:
    """The task name `train` uses when none is given: the data folder's name, made to fit."""
    return slugify(Path(data or ".").resolve().name)


def write_skipped(run_dir: Path, skipped: list[tuple[str, str]]) -> None:
    write_text(run_dir / "skipped.txt", "".join(f"{file}\t{reason}\n" for file, reason in skipped))
