"""Shared fixtures: tiny timm ViTs built locally (no hub), and an isolated task registry."""
from __future__ import annotations

import os

import pytest
import torch

from vpt_cli.config import BackboneConfig
from vpt_cli.models.backbones import create_backbone

TINY_KWARGS = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: a second torch thread would only contend
    torch.set_num_threads(1)


def tiny_config(**overrides) -> BackboneConfig:
    """A 2-block, width-64 ViT at 32 px: every code path, a fraction of a second per step."""
    fields = dict(name="vit_tiny_patch16_224", img_size=32, kwargs=dict(TINY_KWARGS))
    fields["kwargs"].update(overrides.pop("kwargs", {}))
    fields.update(overrides)
    return BackboneConfig(**fields)


@pytest.fixture
def tiny_backbone():
    torch.manual_seed(0)
    return create_backbone(tiny_config(), pretrained=False)


@pytest.fixture
def tiny_weights(tiny_backbone, tmp_path):
    """The tiny backbone saved as a local weights file, as a user would pass --backbone-weights."""
    from safetensors.torch import save_file

    path = tmp_path / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    return path


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own VPT_HOME so no test sees another's tasks (or the user's), and runs
    in its own folder, where `runs/` folders are written."""
    home = tmp_path / "vpt_home"
    monkeypatch.setenv("VPT_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home
