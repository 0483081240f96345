"""PromptedViT: Visual Prompt Tuning (Jia et al., ECCV 2022) on an unmodified timm ViT.

The backbone is a stock timm `VisionTransformer`, so any checkpoint of that family loads as-is;
this module only re-runs its forward with prompt tokens spliced in after the prefix tokens
(CLS and register tokens). Semantics follow shared/docs/vpt-method.md exactly:

* prompts join the sequence after position embeddings are added, so they get none;
* VPT-deep replaces the previous block's prompt outputs with the next layer's own prompts;
* no attention mask; final norm and the backbone's own pooling, then a new linear head.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from vpt_cli.blocks import block_rows, rows_read_after
from vpt_cli.config import PromptConfig

# Called with (layer index, batch size); returns that layer's prompt tokens (B, N, D), or None
# when nothing is inserted before that block.
PromptSource = Callable[[int, int], "torch.Tensor | None"]


def prompt_init_bound(patch_size: int, prompt_dim: int) -> float:
    """Half-width of the paper's uniform prompt init: sqrt(6 / (3 * p * p + d))."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + prompt_dim))


def embed_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Prefix and patch tokens with position embeddings: the sequence prompts are spliced into."""
    x = backbone.patch_embed(images)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    return backbone.norm_pre(x)


@torch.no_grad()
def sample_patch_tokens(backbone: nn.Module, images: torch.Tensor, depth: int, count: int) -> torch.Tensor:
    """(depth, count, D): for each of the first `depth` blocks, `count` patch tokens of its input in
    the plain (unprompted) forward of `images`, each from a random image and position."""
    x = embed_tokens(backbone, images)
    prefix = backbone.num_prefix_tokens
    picks = []
    for index, block in enumerate(backbone.blocks[:depth]):
        patches = x[:, prefix:]
        image = torch.randint(patches.shape[0], (count,)).to(patches.device)
        position = torch.randint(patches.shape[1], (count,)).to(patches.device)
        picks.append(patches[image, position])
        if index + 1 < depth:
            x = block(x)
    return torch.stack(picks)


def encode_with_prompts(
    backbone: nn.Module, images: torch.Tensor, prompt_source: PromptSource, num_prompts: int
) -> torch.Tensor:
    """The backbone's forward up to pooled pre-logits, with prompts from `prompt_source`.

    Before block 0 the prompts are added to the sequence; before a later block, a non-None
    result replaces them (VPT-deep). vpt_cli.multitask runs the same layout with each sample's
    own task prompts.

    The prompts ride at the end of the sequence rather than right after the prefix tokens: they
    have no position embedding and nothing is masked, so attention treats tokens as a set and
    the paper's [prefix, prompts, patches] order gives the same numbers up to float summation
    order. Kept at the end, the rows nobody reads form a tail that `block_rows` can skip: the
    prompt outputs a deep layer replaces, and all but CLS in the last block under CLS pooling.
    """
    x = embed_tokens(backbone, images)
    batch, tokens = x.shape[:2]
    blocks = backbone.blocks
    upcoming = prompt_source(0, batch) if num_prompts else None
    for index, block in enumerate(blocks):
        if upcoming is not None:
            x = torch.cat([x[:, :tokens], upcoming.to(x.dtype)], dim=1)
        upcoming = prompt_source(index + 1, batch) if num_prompts and index + 1 < len(blocks) else None
        x = block_rows(block, x, rows_read_after(backbone, index, x.shape[1], tokens, upcoming is not None))
    x = backbone.norm(x)
    return backbone.forward_head(x, pre_logits=True)


class PromptedViT(nn.Module):
    """A frozen timm ViT plus learned prompt tokens and a linear head.

    `prompts` has shape (L, N, d) for VPT-deep and (1, N, d) for VPT-shallow, d being the
    projection input size when `proj_dim` > 0 and the backbone width otherwise. The baselines
    share the class: `linear` has no prompts, `full` also unfreezes the backbone.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, prompt: PromptConfig):
        super().__init__()
        self.backbone = backbone
        self.method = prompt.method
        self.num_prompts = prompt.length
        self.deep = prompt.deep
        width = backbone.embed_dim
        if self.num_prompts:
            prompt_dim = prompt.proj_dim or width
            depth = len(backbone.blocks) if self.deep else 1
            patch = backbone.patch_embed.patch_size[0]
            bound = prompt_init_bound(patch, prompt_dim)
            self.prompts = nn.Parameter(torch.empty(depth, self.num_prompts, prompt_dim).uniform_(-bound, bound))
            self.prompt_proj: nn.Module = nn.Identity()
            if prompt.proj_dim:
                self.prompt_proj = nn.Linear(prompt.proj_dim, width)
                nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
            self.prompt_dropout = nn.Dropout(prompt.resolved_dropout)
        self.prompt_init = prompt.init if self.num_prompts else None
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.train_backbone = prompt.method == "full"
        backbone.requires_grad_(self.train_backbone)
        backbone.train(False)

    def train(self, mode: bool = True) -> "PromptedViT":
        """Switch prompt dropout; the backbone stays in eval mode unless fully fine-tuned."""
        super().train(mode)
        self.backbone.train(mode and self.train_backbone)
        return self

    def init_prompts_from_tokens(self, images: torch.Tensor) -> None:
        """Start each prompt as a patch token that the frozen backbone feeds its layer for `images`
        (prompt.init "tokens"). Such a prompt looks like one more patch to attention, so the
        starting features, and the probe head fitted on them, stay close to the unprompted
        backbone's, where the paper's uniform init costs a few points before training starts
        (README, "Defaults")."""
        if self.prompts.shape[-1] != self.backbone.embed_dim:
            raise ValueError("token init needs prompts in the backbone's width (no projection)")
        tokens = sample_patch_tokens(self.backbone, images, self.prompts.shape[0], self.num_prompts)
        with torch.no_grad():
            self.prompts.copy_(tokens)

    def layer_prompts(self, layer: int, batch: int) -> torch.Tensor | None:
        """Projected prompts for `layer`, expanded per sample, then dropped out per sample."""
        if not self.deep and layer > 0:
            return None
        tokens = self.prompt_proj(self.prompts[layer])
        return self.prompt_dropout(tokens.expand(batch, -1, -1))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features of the prompted backbone (what the head sees)."""
        return encode_with_prompts(self.backbone, images, self.layer_prompts, self.num_prompts)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))

    def task_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a task file stores: everything trained, nothing of the frozen backbone."""
        return {
            name: tensor.detach()
            for name, tensor in self.state_dict().items()
            if self.train_backbone or not name.startswith("backbone.")
        }

    def load_task_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `task_state_dict`; shapes must match exactly."""
        expected = self.task_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"task tensors do not match the model: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(state, strict=False)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser group: prompts (and projection), head, backbone (full only)."""
        groups: dict[str, list[nn.Parameter]] = {"prompts": [], "head": [], "backbone": []}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            group = name.split(".")[0]
            groups["prompts" if group in ("prompts", "prompt_proj") else group].append(param)
        return groups
