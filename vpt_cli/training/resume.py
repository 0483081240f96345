"""Resuming a run: its resumable state in one safetensors file (no pickle), and the settings it must resume with.

Saved at the end of every epoch: the weights, the best weights so far, the optimiser and
scheduler state, the loop's bookkeeping, every random-number generator the next epoch draws
from (torch, Python, the training loader's shuffle), and the run's settings. Restoring all of
it makes an interrupted and resumed run compute exactly what the uninterrupted run computes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from vpt_cli.artifact.schema import read_safetensors_header
from vpt_cli.config import RunConfig, apply_overrides
from vpt_cli.core.errors import TaskError, UsageError, one_line
from vpt_cli.core.fileio import write_bytes
from vpt_cli.models.prompted import PromptedViT


class Checkpoint:
    """One run's checkpoint file; `settings` are the run settings it must be resumed with, `task`
    the task file the run publishes (so a run folder alone says what to resume)."""

    def __init__(self, path: Path, task: str | None = None):
        self.path = Path(path)
        self.task = task

    def exists(self) -> bool:
        return self.path.is_file()

    def saved_task(self) -> str | None:
        """The task file the checkpointed run publishes, from the header alone."""
        self.settings()  # a missing or damaged checkpoint fails here, in one line
        return (read_safetensors_header(self.path).get("__metadata__") or {}).get("task")

    def settings(self) -> dict[str, Any]:
        """The settings stored in the checkpoint, read from its header alone (cheap, no torch)."""
        if not self.exists():
            raise TaskError(f"nothing to resume: no checkpoint at {self.path}")
        try:
            metadata = read_safetensors_header(self.path).get("__metadata__") or {}
            return json.loads(metadata["settings"])
        except (TaskError, KeyError, TypeError, ValueError):
            raise TaskError(f"the checkpoint {self.path} is damaged or from an older vpt-cli; "
                            "start again without --resume (and with --force)") from None

    def save(self, *, model: PromptedViT, best_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any], settings: dict[str, Any],
             rng: dict[str, Any]) -> None:
        tensors = {f"model.{k}": v for k, v in model.task_state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
        optim = optimizer.state_dict()
        for index, param_state in optim["state"].items():
            for key, value in param_state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        tensors.update({f"rng.{k}": v for k, v in rng.items() if isinstance(v, torch.Tensor)})
        metadata = {"state": json.dumps(state), "param_groups": json.dumps(optim["param_groups"]),
                    "scheduler": json.dumps({k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}),
                    "settings": json.dumps(settings, sort_keys=True), **({"task": self.task} if self.task else {}),
                    "rng": json.dumps({k: v for k, v in rng.items() if not isinstance(v, torch.Tensor)})}
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        write_bytes(self.path, save(tensors, metadata=metadata))

    def load(self, *, model: PromptedViT, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Restore weights, optimiser and scheduler in place; return (best weights, loop state, rng states)."""
        self.settings()  # a damaged header fails here, in one line
        try:
            metadata = read_safetensors_header(self.path)["__metadata__"]
            tensors = load_file(str(self.path))
            model.load_task_state_dict(_strip(tensors, "model."))
            optim_state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in _strip(tensors, "optim.").items():
                index, name = key.split(".", 1)
                optim_state.setdefault(int(index), {})[name] = value
            optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(metadata["param_groups"])})
            scheduler.load_state_dict({**json.loads(metadata["scheduler"]), "lr_lambdas": [None] * len(optimizer.param_groups)})
            rng = {**json.loads(metadata["rng"]), **_strip(tensors, "rng.")}
            return _strip(tensors, "best."), json.loads(metadata["state"]), rng
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
            raise TaskError(f"the checkpoint {self.path} cannot be resumed ({one_line(exc, 120)}); "
                            "start again without --resume (and with --force)") from None


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


RESUME_MAY_CHANGE = ("train.device", "data.workers", "train.epochs")



_PATH_SETTINGS = ("data.path", "backbone.weights")



def run_settings(config: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint must be resumed with: the whole config as given (before 'auto'
    values are resolved) as dotted keys with absolute paths, less RESUME_MAY_CHANGE."""
    return {f"{section}.{key}": run_settings_value(f"{section}.{key}", value)
            for section, values in config.to_dict().items() for key, value in values.items()
            if f"{section}.{key}" not in RESUME_MAY_CHANGE}



def settings_config(saved: dict[str, Any], given: dict[str, Any]) -> RunConfig:
    """The config a run resumes with: its checkpoint's settings, plus only what RESUME_MAY_CHANGE
    among the options the user `given` (dotted keys, None = not given); any other given option
    that differs is refused, in one line naming it."""
    asked = {key: run_settings_value(key, value) for key, value in given.items() if value is not None}
    changed = [key for key, value in asked.items() if key not in RESUME_MAY_CHANGE and value != saved.get(key)]
    if changed:
        raise UsageError(f"--resume continues with the run's own settings; these differ: "
                         f"{describe_changes(saved, asked, changed)} (only --epochs, --device and --workers may "
                         "change; start a new run with --force instead)")
    config = RunConfig()
    apply_overrides(config, {**saved, **{k: v for k, v in asked.items() if k in RESUME_MAY_CHANGE}})
    return config.validate()



def run_settings_value(key: str, value: Any) -> Any:
    """`value` as run_settings stores it (absolute paths)."""
    return str(Path(value).resolve()) if key in _PATH_SETTINGS and value else value


def describe_changes(saved: dict[str, Any], current: dict[str, Any], keys: list[str]) -> str:
    """'train.lr None -> 0.5, ...' for the first three `keys`, the settings a resume would change."""
    return ", ".join(f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in keys[:3])



def check_same_settings(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A checkpoint resumes only under the settings it was made with; name what changed."""
    keys = sorted(set(saved) | set(current))
    changed = [key for key in keys if saved.get(key) != current.get(key)]
    if changed:
        shown = describe_changes(saved, current, changed)
        raise TaskError(f"the checkpoint was made with other settings ({shown}); resume with the same settings, "
                        "or start again without --resume (and with --force)")
