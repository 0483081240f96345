"""Opt-in: VPT-deep with real pretrained weights (VPT_TEST_WEIGHTS=.../dinov2_vits14.safetensors).

`.ci/run` sets the variable when the shared DINOv2 ViT-S/14 weights are present.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from vpt_cli import api
from vpt_cli.config import load_config

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
