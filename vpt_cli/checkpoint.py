"""The resumable state of a training run in one safetensors file (no pickle)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from vpt_cli.errors import TaskError
from vpt_cli.fileio import write_bytes
from vpt_cli.models.prompted import PromptedViT


class Checkpoint:
    """The resumable state of a run in one safetensors file (no pickle): weights, best weights,
    optimiser tensors, and the loop's bookkeeping as JSON metadata."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, model: PromptedViT, best_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> None:
        tensors = {f"model.{k}": v for k, v in model.task_state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
        optim = optimizer.state_dict()
        for index, param_state in optim["state"].items():
            for key, value in param_state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        metadata = {"state": json.dumps(state), "param_groups": json.dumps(optim["param_groups"])}
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        write_bytes(self.path, save(tensors, metadata=metadata))

    def load(self, model: PromptedViT, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Restore weights and optimiser in place; return (best weights, loop state)."""
        if not self.path.is_file():
            raise TaskError(f"nothing to resume: no checkpoint at {self.path}")
        with safe_open(str(self.path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(self.path))
        model.load_task_state_dict(_strip(tensors, "model."))
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in _strip(tensors, "optim.").items():
            index, name = key.split(".", 1)
            optim_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(metadata["param_groups"])})
        return _strip(tensors, "best."), json.loads(metadata["state"])


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
