"""Backbone creation: local weights through timm's filter, offline errors, fingerprints."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from vpt_cli.config import BackboneConfig
from vpt_cli.core.errors import BackboneError
from vpt_cli.models.backbones import create_backbone, weights_fingerprint


@pytest.fixture
def weights_file(tiny_backbone, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    return path


def test_local_safetensors_weights_load_exactly(tiny_backbone, weights_file):
    loaded = create_backbone(tiny_config(weights=str(weights_file)))
    assert loaded.fingerprint == tiny_backbone.fingerprint
    assert loaded.weights == str(weights_file.resolve())
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.model(images), tiny_backbone.model(images))


def test_pth_checkpoint_with_wrapper_and_ddp_prefix(tiny_backbone, tmp_path):
    path = tmp_path / "tiny.pth"
    state = {f"module.{k}": v for k, v in tiny_backbone.model.state_dict().items()}
    state["module.head.weight"] = torch.zeros(10, 64)  # a classifier head is dropped, not an error
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = create_backbone(tiny_config(weights=str(path)))
    assert loaded.fingerprint == tiny_backbone.fingerprint


def test_other_image_size_resamples_position_embeddings(weights_file):
    loaded = create_backbone(tiny_config(weights=str(weights_file), img_size=48))
    assert loaded.img_size == 48
    assert loaded.model.pos_embed.shape == (1, 1 + 36, 64)
    assert loaded.data_config["input_size"] == (3, 48, 48)


def test_weights_for_another_architecture_are_refused(weights_file):
    with pytest.raises(BackboneError, match="do not fit"):
        create_backbone(tiny_config(weights=str(weights_file), kwargs=dict(depth=3)))


def test_missing_and_corrupt_weights_files(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(tiny_config(weights=str(tmp_path / "nope.safetensors")))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match="cannot read"):
        create_backbone(tiny_config(weights=str(bad)))
    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(BackboneError, match="unsupported"):
        create_backbone(tiny_config(weights=str(text)))


def test_unknown_model_name():
    with pytest.raises(BackboneError, match="unknown timm model"):
        create_backbone(tiny_config(name="vit_does_not_exist"))


def test_failed_download_names_the_offline_flag(monkeypatch):
    import vpt_cli.models.backbones as backbones

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=pretrained, **kwargs)

    real = backbones.timm.create_model
    monkeypatch.setattr(backbones.timm, "create_model", offline)
    with pytest.raises(BackboneError, match="--backbone-weights FILE") as info:
        create_backbone(tiny_config())
    assert "\n" not in str(info.value)


def test_fingerprint_changes_with_any_weight(tiny_backbone):
    before = weights_fingerprint(tiny_backbone.model)
    with torch.no_grad():
        tiny_backbone.model.blocks[1].mlp.fc2.bias[0] += 1e-3
    assert weights_fingerprint(tiny_backbone.model) != before


def test_backbone_is_frozen_and_in_eval_mode(tiny_backbone):
    assert not tiny_backbone.model.training
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


def test_non_vit_models_are_refused_before_weights_are_read(tmp_path):
    with pytest.raises(BackboneError, match="resnet18.* not a Vision Transformer of a supported family.*supported: .*vit"):
        create_backbone(BackboneConfig(name="resnet18"), pretrained=False)
    unreadable = tmp_path / "weights.safetensors"
    unreadable.write_bytes(b"not weights")  # reading it would fail with another message
    with pytest.raises(BackboneError, match="not a Vision Transformer of a supported family"):
        create_backbone(BackboneConfig(name="resnet18", weights=str(unreadable)))


def test_without_dns_the_hub_is_asked_in_offline_mode_only(monkeypatch):
    import huggingface_hub.constants as hub_constants

    import vpt_cli.models.backbones as backbones

    seen = {}

    def record(name, pretrained=False, **kwargs):
        seen["offline"] = hub_constants.HF_HUB_OFFLINE
        raise OSError("cannot find the requested files in the local cache. Please check your connection")

    monkeypatch.setattr(backbones, "_hub_resolves", lambda: False)
    monkeypatch.setattr(backbones.timm, "create_model", record)
    before = hub_constants.HF_HUB_OFFLINE
    with pytest.raises(BackboneError, match=r"local cache\); on an offline machine pass --backbone-weights FILE"):
        backbones._create_from_hub("vit_base_patch16_224.augreg_in21k", {})
    assert seen["offline"] is True
    assert hub_constants.HF_HUB_OFFLINE == before


def test_offline_without_weights_fails_before_the_data_is_scanned(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import vpt_cli.models.backbones as backbones
    from vpt_cli.cli.app import app

    monkeypatch.setattr(backbones, "_hub_resolves", lambda: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    missing_data = tmp_path / "not-scanned"  # would be exit 3 if the data were looked at first
    result = CliRunner().invoke(app, ["train", str(missing_data), "--task", "t", "-q"])
    assert result.exit_code == 4, result.output
    assert "hub repo timm/vit_base_patch16_224.augreg_in21k" in result.stderr
    assert "--backbone-weights FILE" in result.stderr
