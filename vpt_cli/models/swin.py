"""Swin (timm's SwinTransformer), as vpt-method.md "VPT on Swin" states it.

There is no CLS token, attention runs inside windows and the width doubles at every patch merging,
so prompts cannot simply join one global sequence. Each layer here is one Swin block on
[patches, prompts] (prompts at the end, like every family): the normalised prompts are copied
into every window of their own image, the relative position bias and the shift mask are zero in
their rows and columns, and their outputs are averaged over that image's windows. The last block
of a stage also does the next stage's patch merging, prompts repeated four times along the
channels, so the next layer sees (and VPT-deep may replace) prompts of its own width. Pooling is
the final norm over all tokens, then their mean, prompts included.
"""
from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from torch import nn
from torch.nn import functional as F

from vpt_cli.core.errors import BackboneError
from vpt_cli.models.adapter import FamilyAdapter
from vpt_cli.models.registry import register_adapter


@register_adapter(SwinTransformer)
class SwinAdapter(FamilyAdapter):
    family = "swin"
    model: SwinTransformer

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if model.global_pool != "avg":
            raise BackboneError(f"Swin with global_pool '{model.global_pool}' is not supported (only 'avg')")
        # (block, the next stage's patch merging when the block ends its stage)
        self.layers: list[tuple[SwinTransformerBlock, nn.Module | None]] = []
        for stage, following in zip(model.layers, [*model.layers[1:], None]):
            for position, block in enumerate(stage.blocks):
                ends_stage = position + 1 == len(stage.blocks) and following is not None
                self.layers.append((block, following.downsample if ends_stage else None))

    def layer_widths(self) -> list[int]:
        return [block.dim for block, _ in self.layers]

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(images).flatten(1, 2)  # NHWC -> (B, H * W, C)

    def run_layer(self, index: int, x: torch.Tensor, rows: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """The block on [patches, prompts]; fewer `rows` than tokens drops the prompt outputs."""
        block, merging = self.layers[index]
        patches = block.input_resolution[0] * block.input_resolution[1]
        x = x + block.drop_path1(_window_attention(block, block.norm1(x), attn_mask))
        x = x + block.drop_path2(block.mlp(block.norm2(x)))
        if rows < x.shape[1]:
            x = x[:, :patches]
        return x if merging is None else _merge(merging, x, block.input_resolution)

    def rows_read_by_pooling(self, length: int, pool: str | None) -> int:
        return length

    def own_pool_name(self) -> str | None:
        return "avg"  # the mean over every token, prompts included (vpt-method.md, Swin 5.)

    def pool(self, x: torch.Tensor, prompts: int, pool: str | None) -> torch.Tensor:
        x = self.model.norm(x)
        end = x.shape[1] - prompts
        averaged = {None: x, "avg": x, "avg-patches": x[:, :end], "avg-prompts": x[:, end:]}
        if pool not in averaged:
            raise ValueError(f"pooling '{pool}' is not available on Swin (it has no CLS token)")
        return averaged[pool].mean(1)


def _window_attention(block: SwinTransformerBlock, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Shifted-window attention over normalised [patches, prompts] of each image: its prompts
    join every one of its windows (no bias, no shift mask for them), their outputs averaged."""
    attn = block.attn
    batch, _, channels = x.shape
    height, width = block.input_resolution
    prompts = x.shape[1] - height * width
    grid = x[:, : height * width].reshape(batch, height, width, channels)
    shift, window = block.shift_size, block.window_size
    if any(shift):
        grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_height, pad_width = (-height) % window[0], (-width) % window[1]  # timm pads up to whole windows
    grid = F.pad(grid, (0, 0, 0, pad_width, 0, pad_height))
    padded_height, padded_width = grid.shape[1], grid.shape[2]
    windows = window_partition(grid, window).reshape(-1, block.window_area, channels)  # image-major
    count = windows.shape[0] // batch
    copies = x[:, height * width:, None].expand(-1, -1, count, -1).transpose(1, 2)
    copies = copies.reshape(batch * count, prompts, channels)
    tokens = torch.cat([copies, windows], dim=1)
    bias = _window_bias(block, grid, prompts, count, None if key_mask is None else key_mask[..., height * width:])
    qkv = attn.qkv(tokens).reshape(tokens.shape[0], tokens.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=attn.scale)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[1], -1)))
    prompt_out = out[:, :prompts].reshape(batch, count, prompts, channels).mean(1)
    grid = window_reverse(out[:, prompts:].reshape(-1, *window, channels), window, padded_height, padded_width)
    grid = grid[:, :height, :width]
    if any(shift):
        grid = torch.roll(grid, shifts=shift, dims=(1, 2))
    return torch.cat([grid.reshape(batch, height * width, channels), prompt_out], dim=1)


def _window_bias(block: SwinTransformerBlock, grid: torch.Tensor, prompts: int, count: int,
                 prompt_keys: torch.Tensor | None) -> torch.Tensor:
    """Additive attention bias over [prompts, window] for the `count` windows of every image in
    the shifted, padded `grid`: the relative position bias and the shift mask, both zero in the
    prompt rows and columns, and -inf for the padded prompt slots (`prompt_keys` (B, 1, 1, N),
    False there) of a mixed-task batch."""
    bias = F.pad(block.attn._get_rel_pos_bias(), (prompts, 0, prompts, 0))  # (1, heads, N + area, N + area)
    shift_mask = block.get_attn_mask(grid) if getattr(block, "dynamic_mask", False) else block.attn_mask
    if shift_mask is not None:  # (windows, area, area), repeated for each image
        bias = bias + F.pad(shift_mask, (prompts, 0, prompts, 0)).repeat(grid.shape[0], 1, 1)[:, None]
    if prompt_keys is None:
        return bias
    keys = prompt_keys.repeat_interleave(count, dim=0)  # image-major, like the windows
    keys = torch.cat([keys, keys.new_ones(keys.shape[:-1] + (block.window_area,))], dim=-1)
    return torch.where(keys, bias, float("-inf"))


def _merge(merging: nn.Module, x: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """timm's patch merging on the patch grid; each prompt repeated 4 times along the channels goes
    through the same LayerNorm and reduction."""
    height, width = resolution
    batch, _, channels = x.shape
    patches = merging(x[:, : height * width].reshape(batch, height, width, channels)).flatten(1, 2)
    prompts = merging.reduction(merging.norm(x[:, height * width:].repeat(1, 1, 4)))
    return torch.cat([patches, prompts], dim=1)
