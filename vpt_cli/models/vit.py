"""The plain timm VisionTransformer (ViT, DeiT, DINOv2, CLIP/SigLIP towers, register tokens).

Absolute position embeddings are added inside `_pos_embed`, before prompts join, so prompts get
none; prefix tokens (CLS and registers) come first. Pooling is the model's own `forward_head`
(CLS token, average, max or attention pooling): under CLS pooling the last layer computes one
row; every other pooling reads all rows, prompts included, as the reference does for MAE.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from vpt_cli.models.adapter import FamilyAdapter
from vpt_cli.models.registry import register_adapter
from vpt_cli.models.rows import block_rows


@register_adapter(VisionTransformer)
class ViTAdapter(FamilyAdapter):
    family = "vit"
    model: VisionTransformer

    @property
    def width(self) -> int:
        return self.model.embed_dim

    def layer_widths(self) -> list[int]:
        return [self.model.embed_dim] * len(self.model.blocks)

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def patch_size(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.model.patch_embed.num_patches

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(model.patch_drop(x))

    def run_layer(self, index: int, x: torch.Tensor, rows: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return block_rows(self.model.blocks[index], x, rows, attn_mask)

    def rows_read_by_pooling(self, length: int) -> int:
        model = self.model
        pools_cls = model.global_pool == "token" and getattr(model, "attn_pool", None) is None
        return 1 if pools_cls else length

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(x), pre_logits=True)
