"""Config: defaults, YAML sections, CLI overrides on top, and clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vpt_cli.config import RunConfig, load_config
from vpt_cli.config.run import BackboneFacts
from vpt_cli.core.errors import UsageError


def test_yaml_then_overrides_then_validation(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("prompt:\n  method: vpt-shallow\n  num_prompts: 50\ntrain:\n  lr: 0.5\n  epochs: 7\n")
    config = load_config(path, {"train.lr": 0.1, "train.epochs": None})
    assert config.prompt.method == "vpt-shallow" and config.prompt.num_prompts == 50
    assert config.train.lr == 0.1  # the flag wins
    assert config.train.epochs == 7  # an unset flag (None) does not mask the file


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(None, {"backbone.kwargs": {"depth": 2}, "data.val_split": 0.2})
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config
    assert RunConfig.from_dict(yaml.safe_load(config.to_yaml())) == config


@pytest.mark.parametrize("text, message", [
    ("train:\n  lrr: 1\n", "unknown config key 'train.lrr'"),
    ("optim:\n  lr: 1\n", "unknown config section 'optim'"),
    ("prompt:\n  method: lora\n", "prompt.method must be one of"),
    ("train: 3\n", "must be a mapping"),
    ("[1, 2", "not valid YAML"),
])
def test_bad_config_files_give_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        load_config(path)


def test_paper_defaults_and_resolved_values():
    config = load_config()
    assert config.backbone.name == "vit_base_patch16_224.augreg_in21k"
    assert config.prompt.method == "vpt-deep" and config.prompt.num_prompts is None  # auto
    facts = BackboneFacts(name=config.backbone.name, num_patches=196, img_size=224, weights=None, own_pool="token")
    resolved = config.resolve(facts, workers=2)
    assert resolved.prompt.num_prompts == 10  # 224 px / 16 px patches: the paper's 10
    assert config.prompt.num_prompts is None  # a new config: the given one is untouched
    assert resolved.resolve(facts, workers=2) == resolved  # resolving what ran changes nothing
    assert resolved.train.lr == 1e-2 and resolved.train.warmup_epochs == 3 and resolved.data.shots == "all"
    full = load_config(None, {"prompt.method": "full"}).resolve(facts, workers=0)
    assert full.train.lr == 2e-5 and full.prompt.num_prompts == 0  # a fine-tune's backbone lr; no prompts
    assert config.prompt.resolved_dropout == 0.1
    sgd = load_config(None, {"train.optimizer": "sgd", "train.batch_size": 64})
    assert sgd.train.resolved_lr() == pytest.approx(2.5 * 64 / 256)
    assert sgd.train.resolved_warmup() == sgd.train.epochs // 10
    with pytest.raises(UsageError, match="--prompts"):
        load_config(None, {"prompt.num_prompts": 0})


def test_token_prompt_init_refuses_a_projection():
    assert load_config().prompt.init == "tokens"
    with pytest.raises(UsageError, match="prompt.init: uniform"):
        load_config(None, {"prompt.proj_dim": 16})
    assert load_config(None, {"prompt.proj_dim": 16, "prompt.init": "uniform"}).prompt.proj_dim == 16
    with pytest.raises(UsageError, match="prompt.init must be one of"):
        load_config(None, {"prompt.init": "zeros"})


@pytest.mark.parametrize("key, value", [("train.lr", -1.0), ("train.head_lr", -0.1), ("train.weight_decay", -1e-4),
                                        ("train.patience", -1), ("data.workers", -2), ("train.lr", float("nan"))])
def test_negative_or_nan_values_are_refused(key, value):
    with pytest.raises(UsageError):
        load_config(None, {key: value, "data.path": "x"})


def test_strict_json_turns_non_finite_numbers_into_null():
    import json

    from vpt_cli.core.fileio import strict_json

    text = strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": (2, -float("inf")), "p": Path("x")})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": [2, None], "p": "x"}
