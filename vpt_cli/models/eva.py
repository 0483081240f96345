"""EVA and EVA02 (timm's Eva): a ViT layout with rotary position embeddings in attention.

timm rotates the queries and keys of every token after the prefix, with one rotation per patch
(`rope`, one row per patch). Prompts carry no position (vpt-method.md, "Other position schemes"),
so the rope is extended with identity rotations (sine 0, cosine 1) for the prompt rows at the end
of the sequence: `x * 1 + rot(x) * 0` is `x` exactly, and patches keep their own rotations.
Absolute position embeddings (EVA) are added in `_pos_embed`, before prompts join; pooling is the
model's own `forward_head`, as for the plain ViT.
"""
from __future__ import annotations

import torch
from timm.models.eva import Eva

from vpt_cli.models.registry import register_adapter
from vpt_cli.models.vit import ViTAdapter


@register_adapter(Eva)
class EvaAdapter(ViTAdapter):
    family = "eva"
    model: Eva

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x, _ = model._pos_embed(model.patch_embed(images))  # the rope comes per layer, see `rotary`
        return model.norm_pre(x)

    def run_layer(self, index: int, x: torch.Tensor, rows: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        rope = self.rotary(index, x.shape[1] - self.num_prefix_tokens)
        return self.model.blocks[index](x, rope=rope, attn_mask=attn_mask)[:, :rows]

    def rotary(self, index: int, rows: int) -> torch.Tensor | None:
        """Layer `index`'s rope for `rows` rows after the prefix: the patches' own, then identity."""
        rope_module = self.model.rope
        if rope_module is None:
            return None
        if hasattr(rope_module, "feat_shape"):
            rope = rope_module.get_embed()
        else:  # rope kinds without a stored grid (MRoPE) take it explicitly, as timm's _pos_embed does
            rope = rope_module.get_embed(shape=self.model.patch_embed.grid_size)
        if getattr(self.model, "rope_mixed", False):
            rope = rope[index]  # one rope per layer
        return with_identity_rows(rope, rows)


def with_identity_rows(rope: torch.Tensor, rows: int) -> torch.Tensor:
    """`rope` ([..., patches, sin | cos]) padded along the token axis to `rows` with no rotation."""
    extra = rows - rope.shape[-2]
    if extra <= 0:
        return rope
    sin = rope.new_zeros(*rope.shape[:-2], extra, rope.shape[-1] // 2)
    return torch.cat([rope, torch.cat([sin, torch.ones_like(sin)], dim=-1)], dim=-2)
