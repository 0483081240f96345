"""The resumable state of a training run in one safetensors file (no pickle).

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

from vpt_cli.artifact import read_safetensors_header
from vpt_cli.errors import TaskError, one_line
from vpt_cli.fileio import write_bytes
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
