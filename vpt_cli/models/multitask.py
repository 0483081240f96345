"""Several VPT tasks on one frozen backbone, mixed freely inside one batch.

Tasks differ only in their prompt tokens and heads, so a batch can carry a task index per sample
and still take ONE backbone pass of `prompted_forward`. Each sample gets exactly what its task's
PromptedViT would give it (shared/docs/vpt-method.md), including when tasks differ in prompt
length or deep/shallow:

* Prompt lengths: every sample gets `max_prompts` prompt slots; a shorter task's unused slots are
  padding that the plan's lengths mask out of attention and pooling. With one length, no mask.
* Deep/shallow: before layers 1..L-1, deep samples get their layer's prompts; shallow samples
  keep the previous layer's prompt outputs (a per-sample select, exact).
* Pooling: samples are pooled in groups of equal prompt length and pooling (prompt.pool), each
  without its padding slots, and each sample keeps its own group's features.
* Heads: all heads are stacked into one matrix (padded classes have weight 0 and bias -inf, so
  their probability is exactly 0); each sample keeps its own task's logits.

Only the forward of the frozen model lives here; loading tasks is vpt_cli.serving.tasks's job.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vpt_cli.models.prompted import PromptedViT, PromptPlan, Readout, prompted_forward


class MultiTaskViT(nn.Module):
    """Inference-only mix of tasks trained on the same backbone: `forward(images, task_index)`.

    Built from eval-mode PromptedViTs that share `backbone`; their prompts (already projected)
    and heads are copied into stacked buffers, so the task models themselves are not kept.
    Logits have `max_classes` columns; columns past a task's class count are -inf.
    """

    def __init__(self, backbone: nn.Module, tasks: list[PromptedViT]):
        super().__init__()
        if not tasks:
            raise ValueError("a MultiTaskViT needs at least one task")
        if any(task.backbone is not backbone for task in tasks):
            raise ValueError("every task model must be built on the shared backbone")
        self.backbone = backbone
        self.adapter = tasks[0].adapter
        depth, self.widths = self.adapter.depth, self.adapter.layer_widths()
        lengths = [task.num_prompts for task in tasks]
        deep = [task.deep and task.num_prompts > 0 for task in tasks]
        self.max_prompts = max(lengths)
        self.distinct_lengths = sorted(set(lengths))
        task_readouts = [Readout(task.num_prompts, task.pool) for task in tasks]
        self.readouts = list(dict.fromkeys(task_readouts))
        self.any_deep, self.all_deep = any(deep), all(deep)
        bank = torch.zeros(len(tasks), depth, self.max_prompts, max(self.widths))  # zero-padded past a layer's width
        num_classes = [task.head.out_features for task in tasks]
        self.max_classes = max(num_classes)
        weight = torch.zeros(len(tasks), self.max_classes, self.adapter.num_features)
        bias = torch.full((len(tasks), self.max_classes), float("-inf"))
        with torch.no_grad():
            for t, task in enumerate(tasks):
                task.eval()  # no prompt dropout: the prompts a single-task forward would use
                for layer in range(depth if task.deep else 1):
                    tokens = task.layer_prompts(layer, 1) if task.num_prompts else None
                    if tokens is not None:
                        bank[t, layer, : task.num_prompts, : self.widths[layer]] = tokens[0]
                weight[t, : num_classes[t]] = task.head.weight
                bias[t, : num_classes[t]] = task.head.bias
        self.register_buffer("prompt_bank", bank)  # (T, L, max_prompts, max width)
        self.register_buffer("prompt_lengths", torch.tensor(lengths))
        self.register_buffer("deep", torch.tensor(deep))
        self.register_buffer("readout_of_task", torch.tensor([self.readouts.index(r) for r in task_readouts]))
        self.register_buffer("num_classes", torch.tensor(num_classes))
        self.register_buffer("head_weight", weight.flatten(0, 1))  # (T * max_classes, F)
        self.register_buffer("head_bias", bias.flatten())
        self.num_tasks = len(tasks)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "MultiTaskViT":
        """Always eval: this model only serves frozen tasks."""
        return super().train(False)

    def prompt_plan(self, task_index: torch.Tensor) -> PromptPlan:
        """Each sample's own task prompts: a padded, per-sample case of the single-task plan."""
        deep = self.deep.index_select(0, task_index)[:, None, None]

        def prompts_at(layer: int, previous: torch.Tensor | None) -> torch.Tensor | None:
            if previous is None:
                return self._layer_prompts(0, task_index)
            if not self.any_deep:
                return None
            prompts = self._layer_prompts(layer, task_index)
            return prompts if self.all_deep else torch.where(deep, prompts.to(previous.dtype), previous)

        return PromptPlan(slots=self.max_prompts, prompts_at=prompts_at, replaced_before=lambda layer: self.all_deep,
                          readouts=self.readouts, lengths=self.prompt_lengths.index_select(0, task_index),
                          distinct_lengths=self.distinct_lengths,
                          readout_index=self.readout_of_task.index_select(0, task_index))

    def forward_features(self, images: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits, sample i prompted with task `task_index[i]`; one backbone pass."""
        return prompted_forward(self.adapter, images, self.prompt_plan(task_index))

    def _layer_prompts(self, layer: int, task_index: torch.Tensor) -> torch.Tensor:
        """(B, slots, D): each sample's task prompts for `layer`, gathered one layer at a time (a
        whole-bank gather copies L times more and hits a slow CPU index_select path)."""
        return self.prompt_bank[:, layer, :, : self.widths[layer]].index_select(0, task_index)

    def forward(self, images: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        """(B, max_classes) logits of each sample's own task; padded classes are -inf."""
        features = self.forward_features(images, task_index)
        every_head = F.linear(features, self.head_weight.to(features.dtype), self.head_bias.to(features.dtype))
        every_head = every_head.unflatten(1, (self.num_tasks, self.max_classes))
        picked = task_index[:, None, None].expand(-1, 1, self.max_classes)
        return every_head.gather(1, picked).squeeze(1)
