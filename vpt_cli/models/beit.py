"""BEiT (timm's Beit): a ViT layout whose attention adds a relative position bias.

The bias (per block, and/or one shared by all blocks) is a (heads, 1 + P, 1 + P) table over
[CLS, patches]. Prompts carry no position (vpt-method.md, "Other position schemes"): the bias is
zero in every row and column of a prompt, as the reference does for Swin. timm's attention adds
the bias at its fixed size, so the block is run here from its own modules, with the bias padded
by zeros for the prompt rows at the end of the sequence; pooling is the model's own.
"""
from __future__ import annotations

import torch
from timm.models.beit import Beit
from torch import nn
from torch.nn import functional as F

from vpt_cli.models.registry import register_adapter
from vpt_cli.models.vit import ViTAdapter


@register_adapter(Beit)
class BeitAdapter(ViTAdapter):
    family = "beit"
    model: Beit

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.patch_embed(images)
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return model.pos_drop(x)

    def run_layer(self, index: int, x: torch.Tensor, rows: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        block = self.model.blocks[index]
        bias = self.position_bias(block.attn, x.shape[1])
        if attn_mask is not None:
            bias = torch.where(attn_mask, bias, float("-inf"))
        x = x + block.drop_path1(_layer_scale(block.gamma_1, _attention(block.attn, block.norm1(x), bias)))
        x = x + block.drop_path2(_layer_scale(block.gamma_2, block.mlp(block.norm2(x))))
        return x[:, :rows]

    def position_bias(self, attn: nn.Module, length: int) -> torch.Tensor:
        """(1, heads, length, length): the block's and the shared bias over [CLS, patches], zero
        in the rows and columns past them (the prompts)."""
        bias = torch.zeros((), dtype=attn.qkv.weight.dtype, device=attn.qkv.weight.device)
        if attn.relative_position_bias_table is not None:
            bias = bias + attn._get_rel_pos_bias()
        if self.model.rel_pos_bias is not None:
            bias = bias + self.model.rel_pos_bias().unsqueeze(0)
        if bias.dim() == 0:
            return bias.expand(1, attn.num_heads, length, length)
        extra = length - bias.shape[-1]
        return F.pad(bias, (0, extra, 0, extra))


def _attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """timm's BEiT attention with an additive bias of the sequence's own size."""
    batch, length, _ = x.shape
    qkv_bias = None if attn.q_bias is None else torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
    qkv = F.linear(x, attn.qkv.weight, qkv_bias)
    q, k, v = qkv.reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=attn.scale)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(batch, length, -1)))


def _layer_scale(gamma: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if gamma is None else gamma * x
