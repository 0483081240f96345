"""The interface of a family adapter: what the prompted forward needs to know about a backbone.

Prompts carry no position and ride after every other token (vpt-method.md: attention treats
tokens as a set, so this equals the paper's [prefix, prompts, patches] order up to float
summation order); an adapter keeps them that way through its family's machinery.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from vpt_cli.core.errors import ExportError


class FamilyAdapter(ABC):
    """Layout of one backbone family, bound to one model instance.

    Subclasses set `family` and implement the abstract methods; the model itself stays a stock
    timm module, so any checkpoint of the family loads unchanged.
    """

    family = "?"

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def width(self) -> int:
        """Token width at the first layer (the width of the first layer's prompts)."""
        return self.layer_widths()[0]

    @abstractmethod
    def layer_widths(self) -> list[int]:
        """Token width at the input of every layer, in order (one deep prompt bank per layer)."""

    # timm names these alike in every family; an adapter overrides what its family names otherwise.
    @property
    def num_features(self) -> int:
        """Width of the pooled features the head reads."""
        return self.model.num_features

    @property
    def patch_size(self) -> int:
        """Side of a square input patch in pixels (the paper's prompt init bound uses it)."""
        return self.model.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        """Patch tokens at the model's input size (the auto prompt-count rule scales with it)."""
        return self.model.patch_embed.num_patches

    @property
    @abstractmethod
    def num_prefix_tokens(self) -> int:
        """Tokens ahead of the patches (CLS, distillation, registers): never prompts."""

    @property
    def depth(self) -> int:
        return len(self.layer_widths())

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, prefix + patches, width): the positioned sequence that prompts are appended to."""

    @abstractmethod
    def run_layer(self, index: int, x: torch.Tensor, rows: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Layer `index` on `x`, returning only its first `rows` output rows (the rest are unread).
        A layer that ends with patch merging (Swin) returns the merged rows: all of them, or the
        patches alone when `rows` leaves out the prompt tail.

        `attn_mask` (B, 1, 1, tokens), True where a key may be attended, hides padded prompt
        slots of a mixed-task batch."""

    @abstractmethod
    def rows_read_by_pooling(self, length: int, pool: str | None) -> int:
        """How many leading rows of the last layer's output (`length` rows) pooling `pool` reads
        (None: the backbone's own pooling; else one of config.POOLS)."""

    @abstractmethod
    def pool(self, x: torch.Tensor, prompts: int, pool: str | None) -> torch.Tensor:
        """Final norm and pooling `pool` of the last layer's output, whose last `prompts` rows are
        prompt outputs (when pooling reads that far) -> (B, num_features) pre-logits."""

    def own_pool_name(self) -> str | None:
        """The backbone's own pooling by its name in config.POOLS, when it is one of them (a run's
        args.yaml records it); None where it is none of them (an attention-pooling head)."""
        return None

    def enable_dynamic_size(self) -> int:
        """Let the model take any input size a multiple of the returned step, resampling its
        position embeddings in the forward (for a size-dynamic export); families that cannot,
        refuse."""
        raise ExportError(f"the {self.family} family cannot take dynamic input sizes; export at the trained size")
