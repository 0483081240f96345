"""PromptedViT against the method's definition (shared/docs/vpt-method.md)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from vpt_cli.config import PromptConfig
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.prompted import PromptedViT, prompt_init_bound


def reference_forward(backbone, prompts, images, deep):
    """Independent re-computation: explicit token order [CLS, prompts, patches], per-block
    replacement for deep prompts, final norm, CLS output. Written from the method doc only."""
    patches = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)
    cls = backbone.cls_token.expand(len(images), -1, -1)
    tokens = torch.cat([cls, patches], dim=1) + backbone.pos_embed
    n = prompts.shape[1]
    batch_prompts = lambda layer: prompts[layer].unsqueeze(0).expand(len(images), -1, -1)
    tokens = torch.cat([tokens[:, :1], batch_prompts(0), tokens[:, 1:]], dim=1)
    for layer, block in enumerate(backbone.blocks):
        if deep and layer > 0:
            tokens = torch.cat([tokens[:, :1], batch_prompts(layer), tokens[:, 1 + n:]], dim=1)
        tokens = block(tokens)
    return backbone.norm(tokens)[:, 0]


@pytest.mark.parametrize("method", ["vpt-deep", "vpt-shallow"])
def test_forward_matches_independent_reference(tiny_backbone, method):
    torch.manual_seed(1)
    model = PromptedViT(tiny_backbone.model, 5, PromptConfig(method=method, num_prompts=4)).eval()
    images = torch.randn(3, 3, 32, 32)
    expected = reference_forward(tiny_backbone.model, model.prompts.detach(), images, deep=method == "vpt-deep")
    torch.testing.assert_close(model.forward_features(images), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(images), model.head(expected), atol=1e-6, rtol=0)


def test_forward_matches_reference_exactly_in_float64(tiny_backbone):
    model = PromptedViT(tiny_backbone.model, 5, PromptConfig(num_prompts=3)).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = reference_forward(tiny_backbone.model, model.prompts.detach(), images, deep=True)
    torch.testing.assert_close(model.forward_features(images), expected, atol=1e-12, rtol=0)


def test_zero_prompts_reproduce_backbone_features(tiny_backbone):
    # Not bit-equal: the last block computes the CLS row alone (tests/test_blocks.py).
    model = PromptedViT(tiny_backbone.model, 5, PromptConfig(method="linear")).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(images), tiny_backbone.model(images), atol=1e-6, rtol=0)


def test_shapes_of_deep_and_shallow_prompts(tiny_backbone):
    deep = PromptedViT(tiny_backbone.model, 3, PromptConfig(method="vpt-deep", num_prompts=7))
    shallow = PromptedViT(tiny_backbone.model, 3, PromptConfig(method="vpt-shallow", num_prompts=7))
    projected = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=7, proj_dim=16))
    assert deep.prompts.shape == (2, 7, 64)
    assert shallow.prompts.shape == (1, 7, 64)
    assert projected.prompts.shape == (2, 7, 16)
    assert projected(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_init_bound_matches_paper_and_is_respected(tiny_backbone):
    assert prompt_init_bound(16, 768) == pytest.approx(0.0625, abs=1e-4)
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=50))
    bound = math.sqrt(6 / (3 * 8 * 8 + 64))
    assert model.prompts.abs().max() <= bound
    assert model.prompts.abs().max() > 0.8 * bound  # uniform over the whole range, not zeros


def plain_block_inputs(backbone, images):
    """Each block's input patch tokens (rows of all images) in the unprompted forward."""
    tokens = torch.cat([backbone.cls_token.expand(len(images), -1, -1),
                        backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)], dim=1) + backbone.pos_embed
    inputs = []
    for block in backbone.blocks:
        inputs.append(tokens[:, 1:].reshape(-1, tokens.shape[-1]))
        tokens = block(tokens)
    return inputs


@pytest.mark.parametrize("method, layers", [("vpt-deep", 2), ("vpt-shallow", 1)])
def test_token_init_starts_each_prompt_as_a_patch_token_of_its_layer(tiny_backbone, method, layers):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(method=method, num_prompts=6))
    model.init_prompts_from_tokens(images)
    inputs = plain_block_inputs(tiny_backbone.model, images)
    assert model.prompts.shape[0] == layers
    for layer in range(layers):
        distances = torch.cdist(model.prompts[layer].detach(), inputs[layer], compute_mode="donot_use_mm_for_euclid_dist")
        nearest = distances.min(dim=1).values
        assert nearest.max() < 1e-5  # every prompt is one of that layer's patch tokens
        assert len(torch.unique(model.prompts[layer], dim=0)) > 1  # drawn at random, not one token repeated
    projected = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=2, proj_dim=8, init="uniform"))
    with pytest.raises(ValueError, match="projection"):
        projected.init_prompts_from_tokens(images)


def test_only_prompts_and_head_get_gradients(tiny_backbone):
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=2, proj_dim=8)).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"prompts", "prompt_proj.weight", "prompt_proj.bias", "head.weight", "head.bias"}
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_backbone_stays_in_eval_mode_and_prompt_dropout_is_per_sample():
    backbone = create_backbone(tiny_config(kwargs=dict(drop_rate=0.5, drop_path_rate=0.5)), pretrained=False)
    model = PromptedViT(backbone.model, 3, PromptConfig(num_prompts=4, dropout=0.5)).train()
    assert not model.backbone.training and model.prompt_dropout.training
    torch.manual_seed(0)
    tokens = model.layer_prompts(0, batch=8)
    assert not torch.equal(tokens[0], tokens[1])  # each sample has its own dropout mask
    model.eval()
    images = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    first, second = model(images)
    # no dropout anywhere at eval (p=0.5 would move logits by far more; rows of one batch may
    # still differ in the last float bit, as kernels sum them in different orders)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)


def test_default_dropout_follows_the_paper():
    assert PromptConfig(method="vpt-deep").resolved_dropout == 0.1
    assert PromptConfig(method="vpt-shallow").resolved_dropout == 0.0


def test_register_tokens_and_no_cls_token_models():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    with_registers = create_backbone(tiny_config(kwargs=dict(reg_tokens=4)), pretrained=False).model
    model = PromptedViT(with_registers, 3, PromptConfig(method="linear")).eval()
    torch.testing.assert_close(model.forward_features(images), with_registers(images), atol=1e-6, rtol=0)
    prompted = PromptedViT(with_registers, 3, PromptConfig(num_prompts=2)).eval()
    assert prompted(images).shape == (2, 3)

    avg_pool = create_backbone(tiny_config(kwargs=dict(class_token=False, global_pool="avg")), pretrained=False).model
    assert avg_pool.num_prefix_tokens == 0
    model = PromptedViT(avg_pool, 3, PromptConfig(method="linear")).eval()
    assert torch.equal(model.forward_features(images), avg_pool(images))
    # With prompts, average pooling covers the prompt outputs too (the reference behaviour).
    prompted = PromptedViT(avg_pool, 3, PromptConfig(method="vpt-shallow", num_prompts=2)).eval()
    tokens = []
    prompted.backbone.norm.register_forward_hook(lambda m, i, o: tokens.append(o))
    features = prompted.forward_features(images)
    assert tokens[0].shape[1] == 2 + 16
    torch.testing.assert_close(features, prompted.backbone.fc_norm(tokens[0].mean(1)))


def test_task_state_roundtrip(tiny_backbone):
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=2))
    state = model.task_state_dict()
    assert set(state) == {"prompts", "head.weight", "head.bias"}
    other = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=2))
    other.load_task_state_dict(state)
    assert torch.equal(other.prompts, model.prompts)
    with pytest.raises(ValueError):
        other.load_task_state_dict({"prompts": state["prompts"]})
