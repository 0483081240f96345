"""Every supported backbone family against the method's rule (shared/docs/vpt-method.md), and end
to end: train, evaluate, a mixed-task batch, ONNX export. Tiny random instances, 32 px."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_KWARGS
from safetensors.torch import save_file
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.cli.app import app
from vpt_cli.config import BackboneConfig, PromptConfig, RunConfig, TrainConfig
from vpt_cli.core.errors import BackboneError, UsageError
from vpt_cli.export.exporter import export_model
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.multitask import MultiTaskViT
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.serving.loading import load_for_inference

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
FAMILIES = {
    "deit-distilled": BackboneConfig(name="deit_tiny_distilled_patch16_224", img_size=32, kwargs=dict(TINY_KWARGS)),
    "eva": BackboneConfig(name="eva02_tiny_patch14_224", img_size=32, kwargs=dict(TINY_KWARGS)),
    "beit": BackboneConfig(name="beit_base_patch16_224", img_size=32, kwargs=dict(TINY_KWARGS)),
    # 8x8 patches in 4 shifted windows, then 4x4 and 2x2 after two patch mergings
    "swin": BackboneConfig(name="swin_tiny_patch4_window7_224", img_size=32,
                           kwargs=dict(embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=4)),
}
# Variants of a family's position scheme that the re-computation covers too.
VARIANTS = {
    **FAMILIES,
    "beit-shared-bias": replace(FAMILIES["beit"], kwargs=dict(TINY_KWARGS, use_rel_pos_bias=False,
                                                              use_shared_rel_pos_bias=True, use_abs_pos_emb=True)),
}


def tiny(family: str):
    """A random instance; relative position tables (zero at init) are drawn too, so they count."""
    torch.manual_seed(0)
    model = create_backbone(VARIANTS[family], pretrained=False).model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_()
    return model


def prompted(backbone, prompt: PromptConfig, num_classes: int = 3, seed: int = 1) -> PromptedViT:
    """Eval-mode model with prompts and head far from their init, so any misplaced row shows."""
    torch.manual_seed(seed)
    model = PromptedViT(backbone, num_classes, prompt).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_()
    return model


def layer_prompts(prompts: torch.Tensor, layer: int, batch: int) -> torch.Tensor:
    return prompts[layer].unsqueeze(0).expand(batch, -1, -1)


# --- independent re-computations, one per family, written from the method doc's rules --------


def deit_reference(backbone, prompts, images, deep):
    """[CLS, distillation, prompts, patches]; deep prompts replace rows 2..2+N before every block
    but the first; final norm; the mean of the CLS and distillation outputs (timm's head)."""
    batch = len(images)
    patches = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)
    prefix = torch.cat([backbone.cls_token, backbone.dist_token], dim=1).expand(batch, -1, -1)
    tokens = torch.cat([prefix, patches], dim=1) + backbone.pos_embed
    n = prompts.shape[1]
    tokens = torch.cat([tokens[:, :2], layer_prompts(prompts, 0, batch), tokens[:, 2:]], dim=1)
    for layer, block in enumerate(backbone.blocks):
        if deep and layer > 0:
            tokens = torch.cat([tokens[:, :2], layer_prompts(prompts, layer, batch), tokens[:, 2 + n:]], dim=1)
        tokens = block(tokens)
    tokens = backbone.norm(tokens)
    return (tokens[:, 0] + tokens[:, 1]) / 2


def interleaved_rotation(x, sin, cos):
    """Rotate each pair (x[2i], x[2i+1]) by its angle: (a, b) -> (a cos - b sin, b cos + a sin)."""
    a, b = x[..., 0::2], x[..., 1::2]
    sin, cos = sin[..., 0::2], cos[..., 0::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def eva_block(block, x, rotated, sin, cos):
    """One EVA02 block with the rotary rule spelled out: only the rows in `rotated` (the patches)
    get their queries and keys rotated; every other row (CLS, prompts) is left as it is."""
    attn, (batch, length, width) = block.attn, x.shape
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    qkv = torch.nn.functional.linear(block.norm1(x), attn.qkv.weight, bias)
    q, k, v = qkv.reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = q.clone(), k.clone()
    q[:, :, rotated] = interleaved_rotation(q[:, :, rotated], sin, cos)
    k[:, :, rotated] = interleaved_rotation(k[:, :, rotated], sin, cos)
    weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    out = attn.proj(attn.norm((weights @ v).transpose(1, 2).reshape(batch, length, width)))
    x = x + (out if block.gamma_1 is None else block.gamma_1 * out)
    out = block.mlp(block.norm2(x))
    return x + (out if block.gamma_2 is None else block.gamma_2 * out)


def eva_reference(backbone, prompts, images, deep):
    """[CLS, prompts, patches]; rotary angles for the patch rows only; deep prompts replace rows
    1..1+N; the average of every token after CLS (prompts included) through fc_norm."""
    assert not backbone.blocks[0].attn.rotate_half, "the rotation above is the interleaved layout"
    batch = len(images)
    patches = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)
    tokens = torch.cat([backbone.cls_token.expand(batch, -1, -1), patches], dim=1) + backbone.pos_embed
    sin, cos = backbone.rope.get_embed().chunk(2, dim=-1)
    n = prompts.shape[1]
    tokens = torch.cat([tokens[:, :1], layer_prompts(prompts, 0, batch), tokens[:, 1:]], dim=1)
    for layer, block in enumerate(backbone.blocks):
        if deep and layer > 0:
            tokens = torch.cat([tokens[:, :1], layer_prompts(prompts, layer, batch), tokens[:, 1 + n:]], dim=1)
        tokens = eva_block(block, tokens, slice(1 + n, None), sin, cos)
    return backbone.fc_norm(backbone.norm(tokens)[:, 1:].mean(1))


def beit_bias(table, index, heads, n):
    """The relative position bias over [CLS, prompts, patches]: the table's entries for every pair
    of CLS/patch tokens, zero in the N prompt rows and columns."""
    positioned = index.shape[0]
    bias = table[index.reshape(-1)].reshape(positioned, positioned, heads).permute(2, 0, 1)
    rows = torch.cat([torch.tensor([0]), torch.arange(1 + n, n + positioned)])
    full = torch.zeros(heads, positioned + n, positioned + n)
    full[:, rows[:, None], rows[None, :]] = bias
    return full


def beit_reference(backbone, prompts, images, deep):
    """[CLS, prompts, patches]; attention logits plus each block's (and the shared) relative
    position bias, zero for prompts; deep prompts replace rows 1..1+N; fc_norm of the mean of
    every token after CLS, prompts included (the backbone's average pooling)."""
    batch, n = len(images), prompts.shape[1]
    patches = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)
    tokens = torch.cat([backbone.cls_token.expand(batch, -1, -1), patches], dim=1)
    if backbone.pos_embed is not None:
        tokens = tokens + backbone.pos_embed
    tokens = torch.cat([tokens[:, :1], layer_prompts(prompts, 0, batch), tokens[:, 1:]], dim=1)
    shared = backbone.rel_pos_bias
    for layer, block in enumerate(backbone.blocks):
        if deep and layer > 0:
            tokens = torch.cat([tokens[:, :1], layer_prompts(prompts, layer, batch), tokens[:, 1 + n:]], dim=1)
        attn, heads = block.attn, block.attn.num_heads
        bias = 0
        if attn.relative_position_bias_table is not None:
            bias = beit_bias(attn.relative_position_bias_table, attn.relative_position_index, heads, n)
        if shared is not None:
            bias = bias + beit_bias(shared.relative_position_bias_table, shared.relative_position_index, heads, n)
        qkv = torch.nn.functional.linear(block.norm1(tokens), attn.qkv.weight,
                                         torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]))
        q, k, v = qkv.reshape(batch, tokens.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * attn.scale + bias).softmax(-1)
        out = attn.proj((weights @ v).transpose(1, 2).flatten(2))
        tokens = tokens + block.gamma_1 * out
        tokens = tokens + block.gamma_2 * block.mlp(block.norm2(tokens))
    return backbone.fc_norm(backbone.norm(tokens)[:, 1:].mean(1))


def swin_windows(grid, size):
    """The (size*size, C) windows of an (H, W, C) grid, row by row (the shift mask's order)."""
    height, width, channels = grid.shape
    return [grid[i:i + size[0], j:j + size[1]].reshape(-1, channels)
            for i in range(0, height, size[0]) for j in range(0, width, size[1])]


def swin_block(block, grid, prompts):
    """One Swin block for one image, [prompts, patches]: the normalised prompts are put in front
    of every window; bias and shift mask are zero in their rows and columns; their outputs are
    averaged over the windows; both residuals run over all tokens."""
    (height, width, channels), n = grid.shape, len(prompts)
    attn, size, shift = block.attn, block.window_size, block.shift_size
    tokens = torch.cat([prompts, grid.reshape(-1, channels)])
    normed = block.norm1(tokens)
    shifted = torch.roll(normed[n:].reshape(height, width, channels), (-shift[0], -shift[1]), (0, 1))
    area = size[0] * size[1]
    table = attn.relative_position_bias_table[attn.relative_position_index.reshape(-1)]
    bias = table.reshape(area, area, -1).permute(2, 0, 1)
    prompt_outs, patch_out = [], torch.zeros_like(shifted)
    for number, window in enumerate(swin_windows(shifted, size)):
        full_bias = torch.zeros(attn.num_heads, n + area, n + area)
        full_bias[:, n:, n:] = bias + (0 if block.attn_mask is None else block.attn_mask[number])
        q, k, v = attn.qkv(torch.cat([normed[:n], window])).reshape(n + area, 3, attn.num_heads, -1).permute(1, 2, 0, 3)
        out = attn.proj(((q @ k.transpose(-2, -1)) * attn.scale + full_bias).softmax(-1).matmul(v).transpose(0, 1).flatten(1))
        prompt_outs.append(out[:n])
        i, j = divmod(number, width // size[1])
        patch_out[i * size[0]:(i + 1) * size[0], j * size[1]:(j + 1) * size[1]] = out[n:].reshape(*size, channels)
    patch_out = torch.roll(patch_out, shift, (0, 1))
    tokens = tokens + torch.cat([torch.stack(prompt_outs).mean(0), patch_out.reshape(-1, channels)])
    tokens = tokens + block.mlp(block.norm2(tokens))
    return tokens[n:].reshape(height, width, channels), tokens[:n]


def swin_reference(backbone, prompts, images, deep):
    """Image by image (each image's prompts join its own windows only): [prompts, patches]; at
    each patch merging the prompts are repeated 4 times along the channels and go through its
    norm and reduction; deep prompts replace every block's input prompts but the first; the final
    norm over all tokens, then their mean, prompts included."""
    features = []
    for image in images:
        grid, own, layer = backbone.patch_embed(image[None])[0], prompts[0], 0
        for number, stage in enumerate(backbone.layers):
            if number:
                grid = stage.downsample(grid[None])[0]
                own = stage.downsample.reduction(stage.downsample.norm(torch.cat([own] * 4, dim=-1)))
            for block in stage.blocks:
                if deep and layer:
                    own = prompts[layer]
                grid, own = swin_block(block, grid, own)
                layer += 1
        features.append(backbone.norm(torch.cat([own, grid.flatten(0, 1)])).mean(0))
    return torch.stack(features)


REFERENCES = {"deit-distilled": deit_reference, "eva": eva_reference, "beit": beit_reference,
              "beit-shared-bias": beit_reference, "swin": swin_reference}


@pytest.mark.parametrize("method", ["vpt-deep", "vpt-shallow"])
@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_prompted_forward_matches_the_rule(family, method):
    backbone = tiny(family)
    model = prompted(backbone, PromptConfig(method=method, num_prompts=3))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for batch in (images, images[:1]):  # a batch of one, and images that share a batch
            expected = REFERENCES[family](backbone, model.prompts, batch, deep=method == "vpt-deep")
            torch.testing.assert_close(model.forward_features(batch), expected, atol=1e-6, rtol=0)


def test_deit_distilled_own_pooling_has_a_name_that_reproduces_it():
    """args.yaml names every run's pooling: DeiT-distilled's own (the mean of the CLS and
    distillation outputs) is `prefix`, and a run given that name computes the same features, bit
    for bit, with prompts (their outputs are not read) and without."""
    backbone = tiny("deit-distilled")
    facts = create_backbone(VARIANTS["deit-distilled"], pretrained=False).facts
    assert PromptConfig().resolve(facts).pool == "prefix"
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for prompt in (PromptConfig(num_prompts=3), PromptConfig(method="linear")):
        own, named = prompted(backbone, prompt), prompted(backbone, replace(prompt, pool="prefix"))
        with torch.no_grad():
            torch.testing.assert_close(named.forward_features(images), own.forward_features(images), atol=0, rtol=0)
    with pytest.raises(UsageError, match="--pool prefix reads the CLS token"):
        PromptedViT(tiny("swin"), 3, PromptConfig(num_prompts=1, pool="prefix"))


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_no_prompts_reproduce_the_backbone(family):
    backbone = tiny(family)
    model = PromptedViT(backbone, 3, PromptConfig(method="linear")).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
        torch.testing.assert_close(model.forward_features(images), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(backbone(images), expected, atol=0, rtol=0)  # num_classes=0: the same thing


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_evaluates_mixes_and_exports(family, tmp_path):
    backbone = tiny(family)
    weights = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    config = RunConfig(backbone=replace(FAMILIES[family], weights=str(weights)), train=TrainConfig(epochs=1))
    config.prompt = PromptConfig(method="vpt-deep", num_prompts=2)
    config.data.path, config.data.workers = str(SAMPLE), 0
    trained = api.train(config, task=family)
    assert trained.history and trained.val_report is not None
    evaluated = api.evaluate(SAMPLE / "val", trained.task_path, output_dir=tmp_path / "eval")
    assert evaluated.report.top1 == pytest.approx(trained.val_report.top1)

    loaded = load_for_inference(trained.task_path, device="cpu")
    other = prompted(loaded.backbone.model, PromptConfig(method="vpt-shallow", num_prompts=3), num_classes=4)
    tasks = [loaded.model, other]
    mixed = MultiTaskViT(loaded.backbone.model, tasks)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    task_index = torch.tensor([0, 1, 1, 0])
    with torch.inference_mode():
        logits = mixed(images, task_index)
        for row, t in enumerate(task_index.tolist()):
            single = tasks[t](images[row : row + 1])[0]
            torch.testing.assert_close(logits[row, : len(single)], single, atol=1e-5, rtol=0)
    for model, name in ((loaded.model, "single.onnx"), (mixed, "bundle.onnx")):
        exported = export_model(model, 32, "onnx", tmp_path / name)
        assert exported.checked_with.startswith("onnxruntime") and exported.max_abs_diff < 1e-4


def test_swin_refuses_what_it_cannot_read(tmp_path):
    """No CLS token to pool, and no one width for a prompt projection: exit 2, not a crash."""
    swin = tiny("swin")
    with pytest.raises(UsageError, match="changes width by stage"):
        PromptedViT(swin, 3, PromptConfig(num_prompts=2, proj_dim=8, init="uniform"))
    weights = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(weights))
    config = FAMILIES["swin"]
    result = CliRunner().invoke(app, ["train", str(SAMPLE), "--backbone", config.name, "--img-size", "32",
                                      "--backbone-weights", str(weights), "--pool", "token", "--epochs", "1",
                                      *[f"--backbone-arg={k}={list(v) if isinstance(v, tuple) else v}"
                                        for k, v in config.kwargs.items()]])
    assert result.exit_code == 2 and "CLS token" in result.output, result.output


def test_hybrids_are_refused_in_one_line_before_weights_are_read(tmp_path):
    unreadable = tmp_path / "weights.safetensors"
    unreadable.write_bytes(b"not weights")  # reading it would fail with another message
    hybrid = BackboneConfig(name="vit_small_r26_s32_224", weights=str(unreadable), kwargs=dict(depth=1))
    with pytest.raises(BackboneError, match="vit_small_r26_s32_224.* not a Vision Transformer .*CNN-transformer hybrids"):
        create_backbone(hybrid)
    result = CliRunner().invoke(app, ["train", str(SAMPLE), "--backbone", hybrid.name, "--backbone-arg", "depth=1",
                                      "--backbone-weights", str(unreadable)])
    assert result.exit_code == 4 and "hybrid" in result.output and "Traceback" not in result.output
