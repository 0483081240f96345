"""prompt.pool: the reference's readings of the last layer (vpt-method.md, "Pooling variants",
"MAE and MoCo v3"), in the single-task forward, mixed-task batches, ONNX and the task file."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_multitask import check_mixed_equals_single, task_models
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.artifact.home import tasks_dir
from vpt_cli.artifact.schema import Task, TaskInfo, read_task_info, save_task
from vpt_cli.cli.app import app
from vpt_cli.config import POOLS, PromptConfig, RunConfig, TrainConfig, load_config
from vpt_cli.config.run import BackboneFacts
from vpt_cli.core.errors import UsageError
from vpt_cli.export.exporter import export_model
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.multitask import MultiTaskViT
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.serving.loading import load_for_inference

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def reference_features(backbone, prompts, images, pool):
    """[CLS, prompts, patches], VPT-deep, then the reading `pool` of the last layer: the CLS output
    through the final norm and fc_norm (timm's head with global_pool "token"; a token-pooled
    model's fc_norm is the identity), or a mean through fc_norm (a fresh LayerNorm, weight 1 and
    bias 0, when the checkpoint has none) with the final norm left out."""
    batch, n = len(images), prompts.shape[1]
    patches = backbone.patch_embed.proj(images).flatten(2).transpose(1, 2)
    tokens = torch.cat([backbone.cls_token.expand(batch, -1, -1), patches], dim=1) + backbone.pos_embed
    for layer, block in enumerate(backbone.blocks):
        tokens = torch.cat([tokens[:, :1], prompts[layer].expand(batch, -1, -1), tokens[:, 1 + n * (layer > 0):]], dim=1)
        tokens = block(tokens)
    if pool == "token":
        return backbone.fc_norm(backbone.norm(tokens)[:, 0])
    if pool == "prefix":  # this ViT's one prefix token: the CLS output's reading, as a mean of one row
        return backbone.fc_norm(backbone.norm(tokens)[:, :1].mean(1))
    rows = {"avg": tokens[:, 1:], "avg-prompts": tokens[:, 1:1 + n], "avg-patches": tokens[:, 1 + n:]}[pool]
    fc_norm = backbone.fc_norm
    if isinstance(fc_norm, torch.nn.Identity):
        fc_norm = torch.nn.LayerNorm(tokens.shape[-1], eps=1e-6, dtype=tokens.dtype)
    return fc_norm(rows.mean(1))


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("global_pool", ["token", "avg"])  # an MAE-style token checkpoint; a model built with fc_norm
def test_each_pooling_matches_the_reference(global_pool, pool):
    torch.manual_seed(0)
    backbone = create_backbone(tiny_config(kwargs=dict(global_pool=global_pool)), pretrained=False).model
    with torch.no_grad():
        for norm in (backbone.norm, backbone.fc_norm):
            for param in norm.parameters():
                param.normal_()  # away from weight 1 / bias 0, so a wrong norm shows
    # float64: the norms' random weights magnify float32 summation-order noise past 1e-6
    model = PromptedViT(backbone, 3, PromptConfig(num_prompts=3, pool=pool)).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = reference_features(backbone, model.prompts, images, pool)
        torch.testing.assert_close(model.forward_features(images), expected, atol=1e-12, rtol=0)


def test_default_pooling_is_the_backbones_own_and_mae_tags_average():
    def facts(name, own="token"):
        return BackboneFacts(name=name, num_patches=196, img_size=224, weights=None, own_pool=own)

    config = PromptConfig()
    assert config.resolve(facts("vit_base_patch16_224.augreg_in21k")).pool == "token"  # the backbone's own, by name
    assert config.resolve(facts("deit_base_distilled_patch16_224", own="prefix")).pool == "prefix"
    assert config.resolve(facts("vit_base_patch16_224.mae")).pool == "avg"
    assert PromptConfig(pool="token").resolve(facts("vit_large_patch16_224.mae")).pool == "token"
    assert config.pool is None  # resolve returns a new config, the given one is untouched


def test_mixed_batch_pools_each_task_its_own_way():
    torch.manual_seed(0)
    backbone = create_backbone(tiny_config(kwargs=dict(reg_tokens=1)), pretrained=False).model
    check_mixed_equals_single(backbone, [PromptConfig("vpt-deep", 3, pool="avg"), PromptConfig("vpt-shallow", 5),
                                         PromptConfig("vpt-deep", 2, pool="avg-patches"),
                                         PromptConfig("vpt-deep", 4, pool="avg-prompts"),
                                         PromptConfig("vpt-shallow", 3, pool="avg-prompts")])


def test_onnx_bundle_and_single_task_keep_the_pooling(tiny_backbone, tmp_path):
    configs = [PromptConfig("vpt-deep", 3, pool="avg"), PromptConfig("vpt-shallow", 2, pool="avg-prompts"),
               PromptConfig("vpt-deep", 2)]
    models = task_models(tiny_backbone.model, configs)
    for model, name in ((MultiTaskViT(tiny_backbone.model, models), "bundle.onnx"), (models[1], "single.onnx")):
        result = export_model(model, 32, "onnx", tmp_path / name)
        assert result.checked_with.startswith("onnxruntime") and result.max_abs_diff < 1e-4


def test_pool_is_validated(tiny_weights):
    with pytest.raises(UsageError, match="prompt.pool must be one of token, prefix, avg"):
        load_config(overrides={"prompt.pool": "max"})
    with pytest.raises(UsageError, match="avg-prompts"):
        load_config(overrides={"prompt.pool": "avg-prompts", "prompt.method": "linear"})
    no_cls = create_backbone(tiny_config(kwargs=dict(class_token=False, global_pool="avg")), pretrained=False).model
    with pytest.raises(UsageError, match="CLS token"):
        PromptedViT(no_cls, 3, PromptConfig(num_prompts=2, pool="token"))
    result = CliRunner().invoke(app, ["train", str(SAMPLE), "--backbone-weights", str(tiny_weights), "--pool", "max"])
    assert result.exit_code == 2


def test_token_checkpoint_trains_with_avg_and_the_task_file_keeps_it(tiny_weights, tmp_path):
    """An MAE-style file (final norm, no fc_norm) trains with --pool avg; evaluation rebuilds the
    same pooling from the task file."""
    config = RunConfig(backbone=tiny_config(weights=str(tiny_weights)), train=TrainConfig(epochs=1))
    config.prompt = PromptConfig(method="vpt-shallow", num_prompts=2, pool="avg")
    config.data.path, config.data.workers = str(SAMPLE), 0
    trained = api.train(config, task="mae-style")
    assert read_task_info(trained.task_path).prompt["pool"] == "avg"
    assert load_for_inference(trained.task_path).model.pool == "avg"
    evaluated = api.evaluate(SAMPLE / "val", trained.task_path, output_dir=tmp_path / "eval")
    assert evaluated.report.top1 == pytest.approx(trained.val_report.top1)


def test_task_files_from_before_pooling_load_with_the_backbones_own(tiny_backbone, tiny_weights):
    model = task_models(tiny_backbone.model, [PromptConfig("vpt-deep", 2)])[0]
    prompt = asdict(PromptConfig("vpt-deep", 2))
    del prompt["pool"]  # written before the setting existed
    info = TaskInfo(name="old", backbone=tiny_backbone.name, backbone_fingerprint=tiny_backbone.fingerprint,
                    img_size=32, data_config=json.loads(json.dumps(tiny_backbone.data_config, default=list)),
                    prompt=prompt, classes=["a", "b"], backbone_kwargs=tiny_config().kwargs,
                    backbone_weights=str(tiny_weights))
    save_task(Task(info, model.task_state_dict()), tasks_dir() / "old.safetensors")
    loaded = load_for_inference("old", device="cpu")
    assert loaded.model.pool is None
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), model(images), atol=0, rtol=0)
