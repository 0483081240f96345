"""The task file: one safetensors file with the trained tensors and JSON metadata.

Tensors (prompts, optional projection, head; a full fine-tune adds the backbone) are stored
under the names `PromptedViT.task_state_dict()` gives them. Everything else a task needs to be
rebuilt on a standard timm backbone lives in the safetensors string metadata under "vpt_task"
(see README, "The task file"). Writes are atomic; nothing is unpickled when reading. Metadata is
read straight from the safetensors header, without torch, so listing tasks is instant.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vpt_cli.errors import TaskError, one_line
from vpt_cli.fileio import write_bytes

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
METADATA_KEY = "vpt_task"
TASK_SUFFIX = ".safetensors"
_MAX_HEADER_BYTES = 16 * 2**20  # a task's header is a few KB; anything near this is not a task
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class TaskInfo:
    """What a task file says about itself, besides its tensors."""

    name: str
    backbone: str  # timm name with pretrained tag
    backbone_fingerprint: str
    img_size: int
    data_config: dict[str, Any]  # mean, std, interpolation, crop_pct, crop_mode, input_size
    prompt: dict[str, Any]  # PromptConfig fields: method, num_prompts, dropout, proj_dim
    classes: list[str]
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None  # local file used in training, reused when it still exists
    metrics: dict[str, Any] = field(default_factory=dict)  # validation metrics of the kept epoch
    provenance: dict[str, Any] = field(default_factory=dict)  # data, split, seed, config, versions
    format_version: int = FORMAT_VERSION


@dataclass
class Task:
    info: TaskInfo
    tensors: dict[str, "torch.Tensor"]
    path: Path | None = None

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path and self.path.exists() else 0


def save_task(task: Task, path: Path, force: bool = False) -> Path:
    """Write `task` to `path` atomically; refuse to replace an existing file unless `force`."""
    from safetensors.torch import save

    path = Path(path)
    if path.exists() and not force:
        raise TaskError(f"task file {path} already exists; pass --force to overwrite it")
    metadata = {METADATA_KEY: json.dumps(asdict(task.info), sort_keys=True), "format": "vpt-task"}
    tensors = {name: t.detach().cpu().contiguous() for name, t in task.tensors.items()}
    write_bytes(path, save(tensors, metadata=metadata))
    task.path = path
    return path


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, `__metadata__`),
    read with plain file I/O: no torch, no tensor bytes."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= min(_MAX_HEADER_BYTES, os.fstat(handle.fileno()).st_size - 8):
                raise ValueError("no safetensors header")
            header = json.loads(handle.read(size))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TaskError(f"{path} is not a readable task file ({one_line(exc, 120)})") from None
    if not isinstance(header, dict):
        raise TaskError(f"{path} is not a readable task file (its header is not a JSON object)")
    return header


def read_task_info(path: Path) -> TaskInfo:
    """Only the metadata of a task file (cheap: tensors are not read)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    metadata = read_safetensors_header(path).get("__metadata__") or {}
    if METADATA_KEY not in metadata:
        raise TaskError(f"{path} is a safetensors file but not a vpt task (no '{METADATA_KEY}' metadata)")
    try:
        raw = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError):
        raise TaskError(f"{path} has unreadable task metadata (not JSON)") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path} has unreadable task metadata (not a JSON object)")
    version = raw.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise TaskError(f"{path} uses task format {version}; this vpt-cli reads up to {FORMAT_VERSION}, please upgrade")
    known = TaskInfo.__dataclass_fields__
    return TaskInfo(**{k: v for k, v in raw.items() if k in known})


def load_task(path: Path) -> Task:
    """Read a task file; a missing, foreign or newer-format file is a TaskError, not a crash."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_task_info(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TaskError(f"{path} is not a readable task file ({one_line(exc, 120)})") from None
    return Task(info=info, tensors=tensors, path=Path(path))


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


def runs_dir(name: str) -> Path:
    """Where a named task's run log, config and resumable checkpoint live."""
    return vpt_home() / "runs" / name


def check_task_name(name: str) -> str:
    if not _NAME_PATTERN.match(name):
        raise TaskError(f"invalid task name '{name}': use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def resolve_task_path(name_or_path: str | Path) -> Path:
    """`--task` accepts a registry name ('birds') or a path to a task file."""
    text = str(name_or_path)
    if text.endswith(TASK_SUFFIX) or os.sep in text or "/" in text:
        return Path(text).expanduser()
    return tasks_dir() / f"{check_task_name(text)}{TASK_SUFFIX}"


def task_name_from(name_or_path: str | Path) -> str:
    """The registry-style name of a task given by name or path (the file's stem)."""
    return Path(str(name_or_path)).name.removesuffix(TASK_SUFFIX)


def list_tasks() -> list[tuple[Path, TaskInfo]]:
    """Every readable task in the registry, by name; unreadable files are left out, not fatal."""
    found = []
    for path in sorted(tasks_dir().glob(f"*{TASK_SUFFIX}")):
        try:
            found.append((path, read_task_info(path)))
        except TaskError:
            continue
    return found
