"""The method registry: every registered method answers the same questions, and the model, the
config and the task file follow its answers (a row per method; a new method adds one)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from vpt_cli.artifact.schema import Task, TaskInfo, load_task, save_task
from vpt_cli.config import METHODS, PromptConfig, RunConfig
from vpt_cli.core.errors import UsageError
from vpt_cli.methods import MethodInfo, get_method, method_names, register
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.folding import fold_task_state
from vpt_cli.models.prompted import PromptedViT

# (method, prompts?, deep?, trains the backbone?, trained in epochs?)
MATRIX = [
    ("vpt-deep", True, True, False, True),
    ("vpt-shallow", True, False, False, True),
    ("vfpt", True, True, False, True),
    ("vfpt-shallow", True, False, False, True),
    ("linear", False, False, False, False),
    ("full", False, False, True, True),
]


def test_the_matrix_covers_every_registered_method():
    assert [row[0] for row in MATRIX] == list(method_names()) == list(METHODS)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone(tiny_config(), pretrained=False)


@pytest.mark.parametrize("name, prompts, deep, trains_backbone, in_epochs", MATRIX)
def test_the_model_follows_the_method(backbone, tmp_path, name, prompts, deep, trains_backbone, in_epochs):
    info = get_method(name)
    assert (info.prompts, info.deep, info.trains_backbone, info.trains_in_epochs) == (
        prompts, deep, trains_backbone, in_epochs)
    model = PromptedViT(backbone.model, 3, PromptConfig(method=name, num_prompts=2))
    depth = model.adapter.depth
    layers = model.prompts.shape[0] if prompts else 0
    assert layers == info.prompt_layers(depth) == (depth if deep else int(prompts))
    assert any(p.requires_grad for p in model.backbone.parameters()) is trains_backbone
    groups = model.parameter_groups()
    assert bool(groups["prompts"]) is prompts and bool(groups["backbone"]) is trains_backbone
    # the task file's tensor layout check agrees with what the model stores (prompts folded, vfpt)
    state, stored = fold_task_state(model.task_state_dict(), PromptConfig(method=name, num_prompts=2))
    assert any(key.startswith("backbone.") for key in state) is trains_backbone
    task = Task(TaskInfo(name="t", backbone=backbone.name, backbone_fingerprint="0" * 32, img_size=32,
                         data_config=dict(backbone.data_config, input_size=list(backbone.data_config["input_size"]),
                                          mean=list(backbone.data_config["mean"]),
                                          std=list(backbone.data_config["std"])),
                         prompt=stored, classes=["a", "b", "c"]),
                state)
    loaded = load_task(save_task(task, tmp_path / "t.safetensors"))
    assert set(loaded.tensors) == set(state)


@pytest.mark.parametrize("name, prompts, deep, trains_backbone, in_epochs", MATRIX)
def test_the_config_follows_the_method(name, prompts, deep, trains_backbone, in_epochs):
    config = PromptConfig(method=name, num_prompts=3)
    assert config.length == (3 if prompts else 0)
    assert config.deep is deep
    assert config.resolved_dropout == get_method(name).default_dropout
    if not prompts:  # averaging prompt outputs needs prompts
        with pytest.raises(UsageError, match="avg-prompts"):
            RunConfig(prompt=PromptConfig(method=name, pool="avg-prompts")).validate()


def test_an_unknown_method_is_one_line_naming_the_choices():
    with pytest.raises(UsageError, match="vpt-deep, vpt-shallow, vfpt, vfpt-shallow, linear, full") as caught:
        get_method("lora")
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="lora"):
        RunConfig(prompt=PromptConfig(method="lora")).validate()


def test_the_registry_refuses_twins_and_impossible_methods():
    with pytest.raises(ValueError, match="twice"):
        register(get_method("vpt-deep"))
    with pytest.raises(ValueError, match="deep prompts need prompts"):
        MethodInfo(name="x", summary="x", prompts=False, deep=True)
    with pytest.raises(ValueError, match="default_dropout"):
        MethodInfo(name="x", summary="x", prompts=True, default_dropout=1.0)
