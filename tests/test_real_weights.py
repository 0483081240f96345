"""Opt-in: VPT-deep with real pretrained weights (VPT_TEST_WEIGHTS=.../dinov2_vits14.safetensors).

`.ci/run` sets the variable when the shared DINOv2 ViT-S/14 weights are present.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vpt_cli import api
from vpt_cli.config import BackboneConfig, PromptConfig, load_config
from vpt_cli.data import build_transform, load_image
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.prompted import PromptedViT

WEIGHTS = os.environ.get("VPT_TEST_WEIGHTS")
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(not WEIGHTS, reason="set VPT_TEST_WEIGHTS to a dinov2_vits14.safetensors file"),
]


def test_vpt_deep_on_sample_data_beats_chance_by_a_wide_margin(tmp_path):
    config = load_config(None, {
        "data.path": str(SAMPLE), "backbone.name": "vit_small_patch14_dinov2", "backbone.weights": WEIGHTS,
        "backbone.img_size": 56, "train.epochs": 4,
    })
    result = api.train(config, task="fashion")
    assert result.val_report.top1 >= 0.8  # 4 classes: chance is 0.25
    assert result.task_bytes < 0.01 * result.backbone_bytes

    evaluated = api.evaluate(SAMPLE / "val", "fashion", output_dir=tmp_path)
    assert evaluated.report.top1 == pytest.approx(result.val_report.top1)
    exported = api.export("fashion", "onnx", tmp_path / "fashion.onnx")
    assert exported.max_abs_diff is None or exported.max_abs_diff < 1e-4


def test_token_init_leaves_the_starting_features_near_the_backbones():
    """Why prompt.init defaults to tokens: the paper's uniform prompts move a real backbone's CLS
    features far from the unprompted ones before training starts, token-initialised ones barely."""
    backbone = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights=WEIGHTS, img_size=112))
    transform = build_transform(backbone.data_config, train=False)
    images = torch.stack([transform(load_image(f)) for f in sorted((SAMPLE / "train").glob("*/*.png"))[::4]])
    with torch.no_grad():
        clean = backbone.model(images)
        change = {}
        for init in ("uniform", "tokens"):
            torch.manual_seed(0)
            model = PromptedViT(backbone.model, 4, PromptConfig(num_prompts=3, init=init)).eval()
            if init == "tokens":
                model.init_prompts_from_tokens(images[:32])
            change[init] = ((model.forward_features(images) - clean).norm(dim=1) / clean.norm(dim=1)).mean().item()
    assert change["tokens"] < 0.1 and change["uniform"] > 0.3  # measured: 0.06 vs 0.37
