"""The one prompted forward, and PromptedViT: Visual Prompt Tuning on an unmodified timm backbone.

The backbone stays a stock timm model, so any checkpoint of a supported family loads as-is; its
family adapter (vpt_cli.models.registry) says how to embed, run and pool it, and
`prompted_forward` splices prompts in. Semantics follow shared/docs/vpt-method.md exactly:

* prompts join the sequence after position embeddings are added, so they get none;
* VPT-deep replaces the previous layer's prompt outputs with the next layer's own prompts;
* no attention mask (a mixed-task batch masks only its padding); the backbone's own final norm
  and pooling (or the reading a task asks for, prompt.pool), then a new linear head.

The single-task model, the mixed-task model (vpt_cli.models.multitask) and the token init all
run `prompted_forward`; they differ only in the `PromptPlan` they hand it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vpt_cli.config import POOLS, PromptConfig
from vpt_cli.core.errors import UsageError
from vpt_cli.models.adapter import FamilyAdapter
from vpt_cli.models.registry import adapter_for

# Called once per layer with (layer, the prompt rows' outputs of the layer before, None at layer
# 0); returns the (B, slots, D) prompts that layer sees, or None to keep the previous outputs.
LayerPrompts = Callable[[int, "torch.Tensor | None"], "torch.Tensor | None"]
# Called with (layer, that layer's input patch tokens (B, P, D)) while the forward runs.
Observer = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class Readout:
    """How the last layer is read for a group of samples: their own prompt count (slots past it
    are padding) and pooling (None: the backbone's own; else one of config.POOLS)."""

    prompts: int
    pool: str | None = None


@dataclass
class PromptPlan:
    """What the samples of one batch get: `slots` prompt rows after the sequence, filled per layer.

    `replaced_before(layer)` is True when every sample's prompts are replaced before `layer`, so
    the layer before need not compute their outputs. `lengths` (B,) is each sample's own prompt
    count when samples differ; the slots past it are padding, hidden from attention by a key mask
    and left out of pooling. `distinct_lengths` lists the values `lengths` takes (a static list,
    so the forward stays traceable for export). `readouts` lists how samples are pooled (a static
    list), `readout_index` (B,) picks each sample's when there are several.
    """

    slots: int
    prompts_at: LayerPrompts
    replaced_before: Callable[[int], bool]
    readouts: list[Readout]
    lengths: torch.Tensor | None = None
    distinct_lengths: list[int] = field(default_factory=list)
    readout_index: torch.Tensor | None = None


def prompted_forward(adapter: FamilyAdapter, images: torch.Tensor, plan: PromptPlan | None = None,
                     observe: Observer | None = None) -> torch.Tensor:
    """Embed -> insert or replace prompts before each layer -> layers -> final norm -> pooling.

    Prompts ride at the end of the sequence rather than right after the prefix tokens: they have
    no position and nothing is masked, so attention treats tokens as a set and the paper's
    [prefix, prompts, patches] order gives the same numbers up to float summation order. Kept at
    the end, the rows nobody reads form a tail that layers skip: the prompt outputs a deep layer
    replaces, and everything but CLS in the last layer under CLS pooling. The number of rows
    ahead of the prompts is taken afresh at every layer, as patch merging (Swin) shrinks it.
    """
    if plan is None:  # the plain backbone
        plan = PromptPlan(slots=0, prompts_at=lambda layer, previous: None, replaced_before=lambda layer: False,
                          readouts=[Readout(0)])
    x = adapter.embed(images)
    slots = plan.slots
    padded = plan.lengths is not None and len(plan.distinct_lengths) > 1
    prompt_rows = 0  # prompt rows at the end of x
    depth = adapter.depth
    for index in range(depth):
        tokens = x.shape[1] - prompt_rows  # constant in a ViT; patch merging shrinks it in Swin
        if slots:
            prompts = plan.prompts_at(index, x[:, tokens:] if index else None)
            if prompts is not None:
                x = torch.cat([x[:, :tokens], prompts.to(x.dtype)], dim=1)
                prompt_rows = slots
        if observe is not None:
            observe(index, x[:, adapter.num_prefix_tokens:tokens])
        if index + 1 == depth:
            rows = max(adapter.rows_read_by_pooling(x.shape[1], readout.pool) for readout in plan.readouts)
        elif slots and plan.replaced_before(index + 1):
            rows = tokens
        else:
            rows = x.shape[1]
        if rows < x.shape[1]:
            prompt_rows = 0
        x = adapter.run_layer(index, x, rows, _key_mask(plan.lengths, tokens, slots) if padded else None)
    tokens = x.shape[1] - prompt_rows
    pooled = None
    for number, readout in enumerate(plan.readouts):  # each group pooled without its padding slots
        own = adapter.pool(x[:, : tokens + readout.prompts], readout.prompts, readout.pool)
        pooled = own if pooled is None else torch.where((plan.readout_index == number)[:, None], own, pooled)
    return pooled


def _key_mask(lengths: torch.Tensor, tokens: int, slots: int) -> torch.Tensor:
    """(B, 1, 1, tokens + slots): every token may be attended, and each sample's own prompt slots."""
    keep = torch.arange(slots, device=lengths.device) < lengths[:, None]
    return torch.cat([keep.new_ones(keep.shape[0], tokens), keep], dim=1)[:, None, None, :]


def prompt_init_bound(patch_size: int, prompt_dim: int) -> float:
    """Half-width of the paper's uniform prompt init: sqrt(6 / (3 * p * p + d))."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + prompt_dim))


@torch.no_grad()
def sample_patch_tokens(adapter: FamilyAdapter, images: torch.Tensor, depth: int, count: int) -> list[torch.Tensor]:
    """For each of the first `depth` layers, (count, D_layer): `count` patch tokens of its input in
    the plain (unprompted) forward of `images`, each from a random image and position."""
    picks: list[torch.Tensor] = []

    def pick(layer: int, patches: torch.Tensor) -> None:
        if layer < depth:
            image = torch.randint(patches.shape[0], (count,)).to(patches.device)
            position = torch.randint(patches.shape[1], (count,)).to(patches.device)
            picks.append(patches[image, position])

    prompted_forward(adapter, images, observe=pick)
    return picks


def _check_pool(pool: str | None, prompts: int, backbone: nn.Module) -> None:
    """Refuse a pooling the model cannot read (unknown, no CLS token to read, no prompts to
    average): a setting that does not fit the backbone, which config validation cannot see."""
    if pool not in (None, *POOLS):
        raise UsageError(f"unknown pooling '{pool}' (choose one of {', '.join(POOLS)})")
    if pool in ("token", "prefix") and getattr(backbone, "cls_token", None) is None:
        raise UsageError(f"--pool {pool} reads the CLS token, which {type(backbone).__name__} has none of")
    if pool == "avg-prompts" and not prompts:
        raise UsageError("--pool avg-prompts averages the prompt outputs, and this task has none")


class PromptedViT(nn.Module):
    """A frozen timm backbone plus learned prompt tokens and a linear head.

    `prompts` has shape (L, N, d) for VPT-deep and (1, N, d) for VPT-shallow, d being the
    projection input size when `proj_dim` > 0 and the backbone width otherwise. A backbone whose
    width changes by stage (Swin) gets one (N, D_layer) tensor per layer instead, in a
    ParameterList; `prompts[layer]` reads either. The baselines share the class: `linear` has no
    prompts, `full` also unfreezes the backbone.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, prompt: PromptConfig, folded: bool = False):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter_for(backbone)
        self.num_prompts = prompt.length
        self.deep = prompt.deep
        width = self.adapter.width
        if self.num_prompts:
            prompt_dim = prompt.proj_dim or width
            depth = self.adapter.depth if self.deep else 1
            bound = prompt_init_bound(self.adapter.patch_size, prompt_dim)
            widths = self.adapter.layer_widths()[:depth]
            if len(set(widths)) == 1:
                self.prompts = nn.Parameter(torch.empty(depth, self.num_prompts, prompt_dim).uniform_(-bound, bound))
            elif prompt.proj_dim:
                raise UsageError(f"a prompt projection (proj_dim) needs one width at every layer, and "
                                 f"{self.adapter.family} changes width by stage")
            else:  # the first stage's bound for every stage, as the reference inits Swin
                self.prompts = nn.ParameterList(
                    nn.Parameter(torch.empty(self.num_prompts, w).uniform_(-bound, bound)) for w in widths)
            self.prompt_proj: nn.Module = nn.Identity()
            if prompt.proj_dim:
                self.prompt_proj = nn.Linear(prompt.proj_dim, width)
                nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
            self.prompt_dropout = nn.Dropout(prompt.resolved_dropout)
        # Raw prompts get the method's transform in every forward; a task file's are `folded` already.
        self.transform = prompt.info.transform if self.num_prompts and not folded else None
        self.fraction = prompt.resolved_fraction
        self.transformed_rows = prompt.info.transformed_rows(self.num_prompts, self.fraction) if self.transform else 0
        self.prompt_init = prompt.init if self.num_prompts else None
        _check_pool(prompt.pool, self.num_prompts, backbone)
        self.pool = prompt.pool
        self.head = nn.Linear(self.adapter.num_features, num_classes)
        self.train_backbone = prompt.info.trains_backbone
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
        (README, "Defaults"). Prompts the method transforms (vfpt's Fourier prompts) keep the
        paper's uniform init: a transformed patch token is no patch token (start features at
        cosine 0.70 to the unprompted ones, 0.90 from uniform), and zero, closer still (0.93),
        gives Adam steps as large as the prompts themselves, which collapsed a run (docs/vfpt.md)."""
        widths = self.adapter.layer_widths()
        if any(self.prompts[layer].shape[-1] != widths[layer] for layer in range(len(self.prompts))):
            raise ValueError("token init needs prompts in the backbone's width (no projection)")
        tokens = sample_patch_tokens(self.adapter, images, len(self.prompts), self.num_prompts)
        with torch.no_grad():
            for layer, picked in enumerate(tokens):
                self.prompts[layer][self.transformed_rows:].copy_(picked[self.transformed_rows:])

    def layer_prompts(self, layer: int, batch: int) -> torch.Tensor | None:
        """The prompts `layer` sees: its stored ones, transformed by the method (vfpt's Fourier
        prompts; nothing for folded prompts), projected, expanded per sample, then dropped out per
        sample."""
        if not self.deep and layer > 0:
            return None
        prompts = self.prompts[layer]
        if self.transform is not None:
            prompts = self.transform(prompts, self.fraction)
        tokens = self.prompt_proj(prompts)
        return self.prompt_dropout(tokens.expand(batch, -1, -1))

    def prompt_plan(self, batch: int) -> PromptPlan:
        """This task's prompts for every sample of a batch of `batch`: the one-task case of the plan."""
        return PromptPlan(slots=self.num_prompts,
                          prompts_at=lambda layer, previous: self.layer_prompts(layer, batch),
                          replaced_before=lambda layer: self.deep, readouts=[Readout(self.num_prompts, self.pool)])

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features of the prompted backbone (what the head sees)."""
        return prompted_forward(self.adapter, images, self.prompt_plan(images.shape[0]))

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
        """Inverse of `task_state_dict`; names and shapes must match exactly."""
        expected = self.task_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"task tensors do not match the model: missing {missing}, unexpected {unexpected}")
        wrong = [f"{name} {tuple(state[name].shape)} (expected {tuple(tensor.shape)})"
                 for name, tensor in expected.items() if state[name].shape != tensor.shape]
        if wrong:
            raise ValueError(f"task tensors have the wrong shape: {', '.join(wrong[:3])}")
        self.load_state_dict(state, strict=False)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role, the optimiser's one source: `prompts` (and their
        projection), `head` (weight), `head_bias`, `backbone` (a full fine-tune only)."""
        groups: dict[str, list[nn.Parameter]] = {"prompts": [], "head": [], "head_bias": [], "backbone": []}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("backbone."):
                groups["backbone"].append(param)
            elif name.startswith("head."):
                groups["head_bias" if name.endswith("bias") else "head"].append(param)
            else:
                groups["prompts"].append(param)
        return groups
