"""Checkpoints of other training code load as they are downloaded (vpt-method.md, "MAE and MoCo v3")."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from vpt_cli.config import PromptConfig
from vpt_cli.core.errors import BackboneError
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.checkpoints import convert_checkpoint, data_parallel, moco_v3, token_pooled_into_averaging_model
from vpt_cli.models.prompted import PromptedViT


def moco_v3_file(backbone, path):
    """A tiny stand-in for `vit-b-300ep.pth.tar`: the training script's dict, the backbone under
    `module.base_encoder.` next to a momentum encoder, a predictor and a projection head."""
    state = backbone.model.state_dict()
    saved = {f"module.base_encoder.{k}": v for k, v in state.items()}
    saved |= {f"module.momentum_encoder.{k}": v + 1 for k, v in state.items()}
    saved |= {"module.base_encoder.head.0.weight": torch.randn(32, 64), "module.predictor.0.weight": torch.randn(8, 8)}
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": saved,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "betas": (0.9, 0.95), "params": [0]}]}},
               str(path))
    return path


def test_moco_v3_release_loads_as_downloaded(tiny_backbone, tmp_path):
    path = moco_v3_file(tiny_backbone, tmp_path / "vit-b-300ep.pth.tar")
    loaded = create_backbone(tiny_config(weights=str(path)))
    assert loaded.fingerprint == tiny_backbone.fingerprint  # the base encoder, nothing else
    model = PromptedViT(loaded.model, 3, PromptConfig(num_prompts=2, pool="avg")).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_a_plain_tar_archive_is_still_refused(tmp_path):
    archive = tmp_path / "weights.tar"
    archive.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=r"unsupported weights file type '.tar'.*\.pth\.tar"):
        create_backbone(tiny_config(weights=str(archive)))


def test_each_step_leaves_other_layouts_alone(tiny_backbone):
    state = tiny_backbone.model.state_dict()
    for step in (moco_v3, data_parallel, token_pooled_into_averaging_model):
        assert step(state, tiny_backbone.model) is None
    assert convert_checkpoint(state, tiny_backbone.model) is state
    wrapped = {f"module.{k}": v for k, v in state.items()}
    assert convert_checkpoint(wrapped, tiny_backbone.model).keys() == state.keys()


def test_token_pooled_checkpoint_into_an_averaging_model(tiny_backbone, tmp_path):
    """An MAE-style file (final norm, no fc_norm) into a model built with global_pool avg loads
    as the reference loads it, and gives what --pool avg gives on the token-pooled model."""
    path = tmp_path / "mae_style.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    averaging = create_backbone(tiny_config(weights=str(path), kwargs=dict(global_pool="avg"))).model
    assert torch.equal(averaging.fc_norm.weight, torch.ones(64)) and torch.equal(averaging.fc_norm.bias, torch.zeros(64))
    assert not averaging.fc_norm.weight.requires_grad
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    built_to_average = PromptedViT(averaging, 3, PromptConfig(num_prompts=2)).eval()
    torch.manual_seed(3)
    asked_to_average = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=2, pool="avg")).eval()
    with torch.no_grad():
        torch.testing.assert_close(built_to_average(images), asked_to_average(images), atol=1e-6, rtol=0)
