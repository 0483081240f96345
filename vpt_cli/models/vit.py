"""The plain timm VisionTransformer (ViT, DeiT, DINOv2, CLIP/SigLIP towers, register tokens).

Absolute position embeddings are added inside `_pos_embed`, before prompts join, so prompts get
none; prefix tokens (CLS and registers) come first. Pooling is the model's own `forward_head`
(CLS token, average, max or attention pooling) unless a task asks for one of the reference's
readings (vpt-method.md, "Pooling variants"): under CLS pooling the last layer computes one
row; every other pooling reads all rows, prompts included, as the reference does for MAE.
The other ViT-like families (DeiT distilled, EVA, BEiT) share these attributes and pooling.
"""
from __future__ import annotations

import torch
from timm.layers import Format, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from vpt_cli.models.adapter import FamilyAdapter
from vpt_cli.models.registry import register_adapter
from vpt_cli.models.rows import block_rows


@register_adapter(VisionTransformer)
class ViTAdapter(FamilyAdapter):
    family = "vit"
    model: VisionTransformer

    def layer_widths(self) -> list[int]:
        return [self.model.embed_dim] * len(self.model.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    dynamic = False  # set by enable_dynamic_size: position embeddings resampled to each input

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        patches = model.patch_embed(images)
        x = self._dynamic_pos_embed(patches) if self.dynamic else model._pos_embed(patches)
        return model.norm_pre(model.patch_drop(x))

    def _dynamic_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's `_pos_embed` for an NHWC patch grid of any size, resampling without antialiasing
        (which ONNX cannot express, and which only matters when shrinking)."""
        model = self.model
        batch, height, width, channels = x.shape
        pos = resample_abs_pos_embed(model.pos_embed, new_size=(height, width), old_size=model.patch_embed.grid_size,
                                     num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
                                     antialias=False)
        prefix = [token.expand(batch, -1, -1) for token in (model.cls_token, model.reg_token) if token is not None]
        x = x.reshape(batch, -1, channels)
        if model.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return model.pos_drop(x)

    def run_layer(self, index: int, x: torch.Tensor, rows: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return block_rows(self.model.blocks[index], x, rows, attn_mask)

    def rows_read_by_pooling(self, length: int, pool: str | None) -> int:
        if pool is None:
            return self.own_pooling_rows(length)
        return {"token": 1, "prefix": self.num_prefix_tokens}.get(pool, length)

    def own_pool_name(self) -> str | None:
        model = self.model
        if getattr(model, "attn_pool", None) is not None:
            return None
        return {"token": "token", "avg": "avg"}.get(model.global_pool)

    def own_pooling_rows(self, length: int) -> int:
        """Rows the backbone's own `forward_head` reads: CLS alone, or everything."""
        model = self.model
        pools_cls = model.global_pool == "token" and getattr(model, "attn_pool", None) is None
        return 1 if pools_cls else length

    def pool(self, x: torch.Tensor, prompts: int, pool: str | None) -> torch.Tensor:
        model = self.model
        if pool is None:
            return model.forward_head(model.norm(x), pre_logits=True)
        if pool == "token":  # what timm's head does with global_pool "token"
            return model.fc_norm(model.norm(x[:, 0]))
        if pool == "prefix":  # DeiT-distilled's own: the mean of the CLS and distillation outputs
            return model.fc_norm(model.norm(x[:, :self.num_prefix_tokens]).mean(1))
        prefix, end = self.num_prefix_tokens, x.shape[1] - prompts
        averaged = {"avg": x[:, prefix:], "avg-patches": x[:, prefix:end], "avg-prompts": x[:, end:]}
        if pool not in averaged:
            raise ValueError(f"unknown pooling '{pool}'")
        return self.average_norm(averaged[pool].mean(1))

    def average_norm(self, features: torch.Tensor) -> torch.Tensor:
        """The norm after averaging: the model's fc_norm, or, for a token-pooled checkpoint (a
        final norm and no fc_norm), a fresh LayerNorm (weight 1, bias 0, frozen) in place of the
        unused final norm, as the reference loads MAE (vpt-method.md, "MAE and MoCo v3")."""
        model = self.model
        if not isinstance(model.fc_norm, nn.Identity):
            return model.fc_norm(features)
        return F.layer_norm(features, (self.num_features,), eps=getattr(model.norm, "eps", 1e-6))

    def enable_dynamic_size(self) -> int:
        """Switched on after construction (on an export copy): the patch embedding keeps its grid
        (NHWC) and `embed` resamples the position embeddings to it."""
        if type(self) is not ViTAdapter and type(self).embed is not ViTAdapter.embed:
            return super().enable_dynamic_size()  # a family with its own position machinery
        patches = self.model.patch_embed
        patches.strict_img_size, patches.flatten, patches.output_fmt = False, False, Format.NHWC
        self.dynamic = True
        return self.patch_size
