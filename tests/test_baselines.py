"""The baselines in the same engine: linear probe and full fine-tuning, end to end on tiny models."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from vpt_cli import api
from vpt_cli.artifact.schema import load_task, read_task_info
from vpt_cli.config import MIN_VAL_PER_CLASS_TO_SELECT, PromptConfig, RunConfig, TrainConfig, auto_num_prompts
from vpt_cli.config.run import FULL_FINETUNE_LR
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.serving.loading import load_for_inference
from vpt_cli.training import engine

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def run_config(weights: Path, method: str, **train) -> RunConfig:
    config = RunConfig(backbone=tiny_config(weights=str(weights)), train=TrainConfig(**train))
    config.prompt = PromptConfig(method=method, num_prompts=2)
    config.data.path = str(SAMPLE)
    config.data.workers = 0  # loader processes cost more than they save on 220 tiny images
    return config


def test_full_finetune_groups_give_the_backbone_a_lower_lr(tiny_backbone):
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(method="full"))
    groups = {g["name"]: g for g in engine.build_optimizer(model, TrainConfig()).param_groups}
    assert len(groups["backbone"]["params"]) == sum(1 for _ in tiny_backbone.model.parameters())
    assert groups["backbone"]["lr"] == FULL_FINETUNE_LR
    assert FULL_FINETUNE_LR < groups["head"]["lr"] / 10
    explicit = engine.build_optimizer(model, TrainConfig(lr=1e-4)).param_groups
    assert [g["lr"] for g in explicit if g["name"] == "backbone"] == [1e-4]


def test_frozen_methods_allocate_no_state_for_the_backbone(tiny_backbone):
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(method="vpt-deep", num_prompts=2))
    optimizer = engine.build_optimizer(model, TrainConfig())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert not any(name.startswith("backbone.") for name in (g["name"] for g in optimizer.param_groups))


def test_full_finetune_trains_saves_and_reloads_every_backbone_weight(tiny_weights, tmp_path):
    # A zero head starts at chance, so the trained epoch (not the untouched start) is kept.
    result = api.train(run_config(tiny_weights, "full", epochs=1, lr=1e-3, head_init="zeros"), task="full")
    assert result.best_epoch == 1
    original = create_backbone(tiny_config(weights=str(tiny_weights))).model
    pretrained = original.state_dict()
    saved = load_task(result.task_path).tensors
    backbone_keys = {k for k in saved if k.startswith("backbone.")}
    assert backbone_keys == {f"backbone.{k}" for k in pretrained}
    assert any(not torch.equal(saved[f"backbone.{k}"], v) for k, v in pretrained.items())  # it really trained
    info = read_task_info(result.task_path)
    assert info.prompt["method"] == "full" and "backbone" in info.provenance["stores"]
    head = saved["head.weight"].numel() + saved["head.bias"].numel()
    assert result.trainable_params == sum(p.numel() for p in original.parameters()) + head

    loaded = load_for_inference(result.task_path)  # the original backbone file + the stored weights
    for key, value in loaded.model.backbone.state_dict().items():
        assert torch.equal(value, saved[f"backbone.{key}"])
    evaluated = api.evaluate(SAMPLE / "val", result.task_path, output_dir=tmp_path / "eval")
    assert evaluated.report.top1 == pytest.approx(result.val_report.top1)


def test_linear_probe_is_head_only_and_stores_only_the_head(tiny_weights):
    result = api.train(run_config(tiny_weights, "linear"), task="lin")
    assert result.history == [] and result.probe_val_acc is not None
    assert set(load_task(result.task_path).tensors) == {"head.weight", "head.bias"}
    assert read_task_info(result.task_path).provenance["stores"] == "head"
    assert result.val_report.top1 == pytest.approx(result.probe_val_acc)


def test_auto_prompt_count_is_five_percent_of_the_patches_and_is_recorded(tiny_weights):
    assert [auto_num_prompts(n) for n in (4, 16, 196, 256)] == [1, 1, 10, 13]  # 196: the paper's 10 at 224 px
    config = run_config(tiny_weights, "vpt-deep", epochs=1)
    config.prompt.num_prompts = None  # auto: the tiny ViT at 32 px has 2 x 2 patches, so the minimum, 1
    result = api.train(config, task="auto-prompts")
    info = read_task_info(result.task_path)
    assert info.prompt["num_prompts"] == 1 and info.provenance["config"]["prompt"]["num_prompts"] == 1
    assert load_task(result.task_path).tensors["prompts"].shape[1] == 1


def make_split(root: Path, val_per_class: int) -> Path:
    """sample_data's train folder plus a val folder of `val_per_class` images per class."""
    shutil.copytree(SAMPLE / "train", root / "train")
    for folder in (SAMPLE / "train").iterdir():
        (root / "val" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:val_per_class]:
            shutil.copy(image, root / "val" / folder.name)
    return root


@pytest.mark.parametrize("val_per_class, auto_picks", [(MIN_VAL_PER_CLASS_TO_SELECT - 1, "last"),
                                                       (MIN_VAL_PER_CLASS_TO_SELECT, "best")])
def test_auto_selection_keeps_the_last_epoch_on_a_small_val_split(tiny_weights, tmp_path, val_per_class, auto_picks):
    config = run_config(tiny_weights, "vpt-deep", epochs=3, lr=0.0, head_lr=0.0, patience=2)
    config.data.path = str(make_split(tmp_path / "data", val_per_class))
    other = {"last": "best", "best": "last"}[auto_picks]
    for select, picks in (("auto", auto_picks), (other, other)):
        config.train.select = select
        result = api.train(config, task=f"val-{select}", force=True)  # val never changes: lr 0
        assert result.selection == picks
        if picks == "last":  # no early stop, the last epoch kept
            assert not result.stopped_early and result.best_epoch == 3 and all(h.is_best for h in result.history)
        else:
            assert result.stopped_early and result.best_epoch == 0
