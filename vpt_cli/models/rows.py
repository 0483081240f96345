"""A timm ViT block evaluated for only the leading rows of its input sequence.

Keys and values need every token, but a token's own output is only worth computing when
something later reads it. In VPT-deep the prompt outputs of blocks 0..L-2 are thrown away (the
next layer brings its own prompts), and under CLS pooling the last block is read at one row.
Skipping those rows' query, attention output, projection and MLP saves their time and, in
training, the activations autograd would keep for them. Each kept row gets the same numbers as
the full block (up to float summation order): attention is computed per query row.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention, Block
from torch import nn
from torch.nn import functional as F


def supports_row_subset(block: nn.Module) -> bool:
    """True for the stock timm block/attention pair this module knows how to split."""
    return type(block) is Block and type(block.attn) is Attention


def block_rows(block: nn.Module, x: torch.Tensor, rows: int, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`block(x, attn_mask)[:, :rows]`, computing only those rows where the block allows it."""
    if rows >= x.shape[1] or not supports_row_subset(block):
        out = block(x) if attn_mask is None else block(x, attn_mask=attn_mask)
        return out[:, :rows]
    attn = block.attn
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    width = heads * head_dim  # timm >= 1.0.20 also names it attn.attn_dim
    normed = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    query_rows = normed[:, :rows]
    q = F.linear(query_rows, weight[:width], None if bias is None else bias[:width])
    kv = F.linear(normed, weight[width:], None if bias is None else bias[width:])
    q = q.reshape(batch, rows, heads, head_dim).transpose(1, 2)
    k, v = kv.reshape(batch, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, rows, width)
    norm = getattr(attn, "norm", None)  # scale_norm: timm >= 1.0.9
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)  # gated attention: timm >= 1.0.20
    if gate is not None:
        out = out * gate(query_rows).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    y = x[:, :rows] + block.drop_path1(block.ls1(out))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
