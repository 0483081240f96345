"""Checkpoint layouts of other training code, converted to timm's before timm's own filter runs.

Each step is a small detect-and-convert function keyed on key patterns (as timm's
`checkpoint_filter_fn` does): it returns the converted state dict, or None when the layout is not
its own. `convert_checkpoint` runs them in order, so the next format is one more function in
`STEPS`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
Step = Callable[[StateDict, nn.Module], "StateDict | None"]

_CONTAINER_KEYS = ("state_dict", "model", "module")  # training scripts' wrappers around the tensors


def model_tensors(saved: Any) -> StateDict | None:
    """The tensors of {'state_dict': ...}, {'model': ...} or {'module': ...} (nested), or of a
    bare state dict; None when `saved` holds no dict at all."""
    for key in _CONTAINER_KEYS:
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            saved = saved[key]
    if not isinstance(saved, dict):
        return None
    return {k: v for k, v in saved.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def moco_v3(state: StateDict, model: nn.Module) -> StateDict | None:
    """MoCo v3 (`vit-b-300ep.pth.tar`): the backbone is the base encoder; the momentum encoder and
    the predictor are dropped (its projection `head.` goes with every other head)."""
    for prefix in ("module.base_encoder.", "base_encoder."):
        if any(k.startswith(prefix) for k in state):
            return _strip_prefix(state, prefix)
    return None


def data_parallel(state: StateDict, model: nn.Module) -> StateDict | None:
    """A model saved from inside DistributedDataParallel: every key starts with `module.`."""
    if state and all(k.startswith("module.") for k in state):
        return _strip_prefix(state, "module.")
    return None


def token_pooled_into_averaging_model(state: StateDict, model: nn.Module) -> StateDict | None:
    """A token-pooled checkpoint (final `norm`, no `fc_norm`, as MAE ships) into a model built to
    average (`fc_norm`, no final norm): what the reference's non-strict load leaves, `norm` unused
    and `fc_norm` at its fresh init, weight 1 and bias 0."""
    own = model.state_dict()
    if not ("norm.weight" in state and "fc_norm.weight" not in state
            and "fc_norm.weight" in own and "norm.weight" not in own):
        return None
    converted = {k: v for k, v in state.items() if not k.startswith("norm.")}
    converted["fc_norm.weight"] = torch.ones_like(own["fc_norm.weight"])
    if "fc_norm.bias" in own:
        converted["fc_norm.bias"] = torch.zeros_like(own["fc_norm.bias"])
    return converted


STEPS: tuple[Step, ...] = (moco_v3, data_parallel, token_pooled_into_averaging_model)


def convert_checkpoint(state: StateDict, model: nn.Module) -> StateDict:
    """`state` after every step whose layout it has."""
    for step in STEPS:
        converted = step(state, model)
        if converted is not None:
            state = converted
    return state
