"""Shared fixtures: tiny timm ViTs built locally (no hub), and an isolated task registry."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vpt_cli.config import BackboneConfig, PromptConfig
from vpt_cli.models.backbones import create_backbone

TINY_KWARGS = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: a second torch thread would only contend
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `heavy` first (the order is otherwise kept): the longest jobs start while the
    short ones are left to fill the other workers, instead of one of them starting last and
    running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


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


def write_task_file(backbone, weights, config, name: str, folder, num_classes: int, seed: int = 1):
    """A task file in `folder` as `vpt train` would write it: random prompts and a non-trivial head."""
    import json
    from dataclasses import asdict

    from vpt_cli.artifact.schema import Task, TaskInfo, save_task
    from vpt_cli.models.prompted import PromptedViT

    torch.manual_seed(seed)
    model = PromptedViT(backbone.model, num_classes, config).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.5)
    info = TaskInfo(name=name, backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
                    img_size=backbone.img_size, data_config=json.loads(json.dumps(backbone.data_config, default=list)),
                    prompt=asdict(config), classes=[f"{name}-{c}" for c in range(num_classes)],
                    backbone_kwargs=tiny_config().kwargs, backbone_weights=str(weights))
    return save_task(Task(info, model.task_state_dict()), folder / f"{name}.safetensors", force=True)


SERVE_IMAGES = [sorted((Path(__file__).resolve().parents[1] / "sample_data" / "val" / kind).iterdir())[i]
                for kind in ("bag", "dress", "sneaker") for i in range(2)]
SERVE_TASKS = {"deep3": (PromptConfig("vpt-deep", 3), 2), "shallow5": (PromptConfig("vpt-shallow", 5), 3),
               "proj2": (PromptConfig("vpt-deep", 2, proj_dim=16), 4)}


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> dict:
    """For the serving tests: three tiny task files on one backbone, one on another backbone, and `vpt predict`'s answers."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    backbone = create_backbone(tiny_config(), pretrained=False)
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(weights))
    folder = root / "tasks"
    folder.mkdir()
    for seed, (name, (config, classes)) in enumerate(SERVE_TASKS.items(), 1):
        write_task_file(backbone, weights, config, name, folder, classes, seed=seed)
    torch.manual_seed(7)
    other = create_backbone(tiny_config(), pretrained=False)
    other_weights = root / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(other_weights))
    stranger = write_task_file(other, other_weights, PromptConfig("vpt-deep", 2), "stranger", root, 2)
    from vpt_cli import api

    paths = [str(folder / f"{name}.safetensors") for name in SERVE_TASKS]
    predicted = api.predict([str(image) for image in SERVE_IMAGES], paths, top_k=5, device="cpu")
    expected = {(Path(p.file).name, p.task): p.top for p in predicted.predictions}
    return {"root": root, "folder": folder, "weights": weights, "backbone": backbone, "stranger": stranger,
            "expected": expected}


