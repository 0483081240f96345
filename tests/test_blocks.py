"""block_rows: a timm block's leading output rows, computed without the rest."""
from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_config
from timm.models.vision_transformer import Attention, Block, ResPostBlock
from torch.utils.flop_counter import FlopCounterMode

from vpt_cli.config import PromptConfig
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.models.registry import adapter_for
from vpt_cli.models.rows import block_rows, supports_row_subset


def make_block(**kwargs) -> Block:
    torch.manual_seed(0)
    block = Block(64, num_heads=4, **kwargs).eval()
    for p in block.parameters():  # non-trivial LayerScale / norm parameters
        torch.nn.init.normal_(p, std=0.2)
    return block


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


BLOCKS = {
    "plain": dict(),
    "qkv bias + layer scale": dict(qkv_bias=True, init_values=0.5),
    "qk norm": dict(qk_norm=True, qkv_bias=True),
}


@pytest.mark.parametrize("kwargs", BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.parametrize("rows", [1, 7, 12])
def test_rows_match_the_full_block(kwargs, rows):
    block = make_block(**kwargs)
    x = torch.randn(3, 12, 64)
    torch.testing.assert_close(block_rows(block, x, rows), block(x)[:, :rows], atol=1e-6, rtol=1e-5)


GATED = "gated" in inspect.signature(Attention.__init__).parameters  # timm >= 1.0.31


@pytest.mark.skipif(not GATED, reason="this timm has no gated attention (added in timm 1.0.31)")
def test_gated_attention_and_attention_mask():
    block = make_block(qkv_bias=True)
    block.attn = Attention(64, num_heads=4, qkv_bias=True, gated=True).eval()
    x = torch.randn(2, 10, 64)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., 7:] = False  # sample 0 hides its last three tokens from attention
    expected = block(x, attn_mask=mask)[:, :5]
    torch.testing.assert_close(block_rows(block, x, 5, attn_mask=mask), expected, atol=1e-6, rtol=1e-5)


def test_input_gradients_match_the_full_block():
    block = make_block(init_values=0.5).requires_grad_(False)
    x = torch.randn(2, 9, 64, requires_grad=True)
    (reference,) = torch.autograd.grad(block(x)[:, :4].square().sum(), x)
    (subset,) = torch.autograd.grad(block_rows(block, x, 4).square().sum(), x)
    torch.testing.assert_close(subset, reference, atol=1e-5, rtol=0)


def test_skipped_rows_cost_nothing_and_other_blocks_fall_back():
    block = make_block()
    x = torch.randn(2, 20, 64)
    assert flops(lambda: block_rows(block, x, 1)) < 0.5 * flops(lambda: block(x))
    other = ResPostBlock(64, num_heads=4).eval()
    assert not supports_row_subset(other)
    torch.testing.assert_close(block_rows(other, x, 3), other(x)[:, :3])


def test_pooling_decides_the_last_block_rows():
    token = create_backbone(tiny_config(), pretrained=False).model
    avg = create_backbone(tiny_config(kwargs=dict(class_token=False, global_pool="avg")), pretrained=False).model
    assert adapter_for(token).rows_read_by_pooling(21, None) == 1
    assert adapter_for(avg).rows_read_by_pooling(21, None) == 21
    assert adapter_for(token).rows_read_by_pooling(21, "avg-patches") == 21  # a task's own pooling wins
    assert adapter_for(avg).rows_read_by_pooling(21, "token") == 1


def test_deep_prompts_skip_the_rows_they_replace(tiny_backbone):
    """VPT-deep does fewer FLOPs than running every block on every row."""
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(method="vpt-deep", num_prompts=8)).eval()
    images = torch.randn(2, 3, 32, 32)
    full_rows = lambda: [tiny_backbone.model.blocks[i](torch.randn(2, 1 + 16 + 8, 64)) for i in range(2)]
    assert flops(lambda: model(images)) < flops(full_rows)
