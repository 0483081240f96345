"""Serving several tasks from one process: load them once onto one backbone, then answer batches.

This is the library API a web service calls (and what `vpt predict` runs on):

    server = load_tasks(["birds", "cars"])
    server.predict([pil_image_1, pil_image_2], ["birds", "cars"], top_k=3)

Each task answers under its own objective (its task type): single-label tasks with their most
probable classes, multi-label tasks with every class over its threshold, in the same batch.

Tasks must have been trained on the same backbone (timm name, weights fingerprint, image size,
data config); anything else is a TaskError, because their prompts would be meaningless on it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from vpt_cli.artifact.home import resolve_task_path
from vpt_cli.artifact.schema import Task, TaskInfo, load_task
from vpt_cli.core.errors import TaskError, UsageError
from vpt_cli.data import build_transform
from vpt_cli.models.backbones import Backbone
from vpt_cli.models.multitask import MultiTaskViT
from vpt_cli.objectives import Answer, Objective
from vpt_cli.runtime.device import autocast
from vpt_cli.serving.loading import load_for_inference, task_model

# (class name, probability), best first: one task's answer for one image (vpt_cli.objectives.Answer).
TopK = Answer

# Tokens per CPU batch for the automatic batch size: past this, bigger batches stop paying off
# on a few cores and only cost memory.
_CPU_TOKENS_PER_BATCH = 8192
_ACCELERATOR_BATCH = 64


@dataclass
class TaskServer:
    """Tasks loaded once onto one backbone; inference changes no state, so one server serves all requests."""

    names: list[str]
    infos: list[TaskInfo]
    backbone: Backbone
    model: MultiTaskViT
    device: torch.device
    transform: Callable[[Image.Image], torch.Tensor]

    @cached_property
    def objectives(self) -> list[Objective]:
        """Each loaded task's task type, in load order: it turns that task's logits into answers
        (built once per server: a hot swap builds a new server, so the tasks never change under it)."""
        return [info.new_objective() for info in self.infos]

    def index(self, task: str) -> int:
        try:
            return self.names.index(task)
        except ValueError:
            raise UsageError(f"task '{task}' is not loaded (loaded: {', '.join(self.names)})") from None

    def task_index(self, tasks: str | Sequence[str], batch: int) -> torch.Tensor:
        """One task for the whole batch, or one per sample -> (B,) indices on the model's device."""
        names = [tasks] * batch if isinstance(tasks, str) else list(tasks)
        if len(names) != batch:
            raise UsageError(f"got {len(names)} task names for {batch} images")
        return torch.tensor([self.index(name) for name in names], device=self.device)

    def logits(self, images: torch.Tensor, task_index: torch.Tensor, amp: bool = False) -> torch.Tensor:
        """(B, max classes) logits, sample i answered by task `task_index[i]`, in one backbone pass."""
        with torch.inference_mode(), autocast(self.device, amp):
            return self.model(images.to(self.device), task_index.to(self.device)).float()

    def top_k(self, logits: torch.Tensor, task_index: torch.Tensor, k: int | None) -> list[TopK]:
        """Each row's answer under its own task's objective: the `k` best classes of that task, or
        with `k` None the task's own answer (multi-label: its classes over their thresholds)."""
        return self.top_k_each(logits, task_index, [k] * len(task_index))

    def top_k_each(self, logits: torch.Tensor, task_index: torch.Tensor, ks: Sequence[int | None]) -> list[TopK]:
        """`top_k` with its own `k` per row (requests in one served batch ask for different k)."""
        objectives, logits = self.objectives, logits.cpu()
        return [objectives[task].answer(logits[row], self.infos[task].classes, k)
                for row, (task, k) in enumerate(zip(task_index.cpu().tolist(), ks))]

    def predict(self, images: torch.Tensor | Sequence[Image.Image], tasks: str | Sequence[str],
                top_k: int | None = None, amp: bool = False) -> list[TopK]:
        """Each image's answer (see `top_k`): a normalised (B, 3, H, W) batch or PIL images, one task or one per image."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.transform(image.convert("RGB")) for image in images])
        index = self.task_index(tasks, images.shape[0])
        return self.top_k(self.logits(images, index, amp), index, top_k)

    def auto_batch_size(self) -> int:
        """Samples per forward: a fixed token budget on CPU, a fixed batch on accelerators."""
        if self.device.type != "cpu":
            return _ACCELERATOR_BATCH
        adapter = self.backbone.adapter
        tokens = adapter.num_patches + adapter.num_prefix_tokens + self.model.max_prompts
        return max(1, min(256, _CPU_TOKENS_PER_BATCH // tokens))


def load_tasks(tasks: Sequence[str | Path], backbone_weights: str | None = None, device: str = "auto") -> TaskServer:
    """Load tasks (registry names or files) onto the first task's backbone, which all must share."""
    if not tasks:
        raise UsageError("give at least one task")
    paths = [resolve_task_path(task) for task in tasks]
    if len(set(paths)) != len(paths):
        raise UsageError("the same task was given twice")
    first = load_for_inference(paths[0], backbone_weights, device)
    return server_for(first.backbone, first.device, [first.task, *(load_task(path) for path in paths[1:])])


def server_for(backbone: Backbone, device: torch.device, tasks: Sequence[Task],
               reference: TaskInfo | None = None) -> TaskServer:
    """A TaskServer of `tasks` on an already loaded backbone; each must match `reference` (default:
    the first task), so a live server can swap its task set without reloading the backbone."""
    if not tasks:
        raise UsageError("give at least one task")
    reference = reference or tasks[0].info
    for task in tasks:
        check_same_backbone(reference, task.info)
    models = [task_model(backbone.model, task).to(device) for task in tasks]
    infos = [task.info for task in tasks]
    if len(models) > 1 and any(model.train_backbone for model in models):
        full = next(info.name for info, model in zip(infos, models) if model.train_backbone)
        raise TaskError(f"task '{full}' fine-tunes the whole backbone, so it cannot share one with other tasks")
    names = [info.name for info in infos]
    if len(set(names)) != len(names):
        raise UsageError(f"two task files share a name ({', '.join(names)}); rename one")
    return TaskServer(names=names, infos=infos, backbone=backbone,
                      model=MultiTaskViT(backbone.model, models).to(device), device=device,
                      transform=build_transform(backbone.data_config, train=False))


def check_same_backbone(reference: TaskInfo, other: TaskInfo) -> None:
    """Prompts only mean something on the backbone they were trained with: refuse any mismatch."""
    for what, mine, theirs in (("backbone", reference.backbone, other.backbone),
                               ("backbone weights fingerprint", reference.backbone_fingerprint, other.backbone_fingerprint),
                               ("backbone arguments", reference.backbone_kwargs, other.backbone_kwargs),
                               ("image size", reference.img_size, other.img_size),
                               ("data config", reference.data_config, other.data_config)):
        if mine != theirs:
            shown = (mine[:12], theirs[:12]) if what.endswith("fingerprint") else (mine, theirs)
            raise TaskError(f"tasks '{reference.name}' and '{other.name}' were trained on different backbones "
                            f"({what}: {shown[0]} vs {shown[1]}); predict them in separate runs")
