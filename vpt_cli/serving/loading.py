"""Loading a task for inference: the task file, its backbone (checked by fingerprint), the model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vpt_cli.artifact.home import resolve_task_path
from vpt_cli.artifact.schema import Task, load_task
from vpt_cli.config import BackboneConfig, PromptConfig
from vpt_cli.core.errors import TaskError
from vpt_cli.models.backbones import Backbone, create_backbone
from vpt_cli.models.folding import FOLDED_FROM
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.runtime.device import pick_device


@dataclass
class LoadedTask:
    """A task ready for inference: the model on its device, and what the task file says."""

    task: Task
    backbone: Backbone
    model: PromptedViT
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return self.task.info.classes


def load_for_inference(task: str | Path, backbone_weights: str | None = None, device: str = "auto") -> LoadedTask:
    """Load a task and rebuild its model on the backbone it was trained on.

    Backbone weights: `backbone_weights` if given, else the file used in training when it still
    exists, else timm's hub. A backbone whose fingerprint differs is refused.
    """
    loaded = load_task(resolve_task_path(task))
    info = loaded.info
    weights = backbone_weights or (info.backbone_weights if info.backbone_weights and Path(info.backbone_weights).is_file() else None)
    backbone = create_backbone(BackboneConfig(name=info.backbone, weights=weights, img_size=info.img_size,
                                              kwargs=info.backbone_kwargs))
    if backbone.fingerprint != info.backbone_fingerprint:
        raise TaskError(
            f"task '{info.name}' was trained on other '{info.backbone}' weights (fingerprint "
            f"{info.backbone_fingerprint[:12]}, these are {backbone.fingerprint[:12]}); pass the original --backbone-weights"
        )
    target = pick_device(device)
    return LoadedTask(task=loaded, backbone=backbone, model=task_model(backbone.model, loaded).to(target), device=target)


def task_model(backbone: torch.nn.Module, task: Task) -> PromptedViT:
    """A task's PromptedViT on an already loaded (possibly shared) backbone, in eval mode."""
    try:
        settings = {key: value for key, value in task.info.prompt.items() if key != FOLDED_FROM}
        model = PromptedViT(backbone, len(task.info.classes), PromptConfig(**settings),
                            folded=FOLDED_FROM in task.info.prompt)
        model.load_task_state_dict(task.tensors)
    except ValueError as exc:
        raise TaskError(f"task file {task.path} is inconsistent: {exc}") from None
    return model.eval()
