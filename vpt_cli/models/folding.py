"""Folding a method's prompt transform into the prompts a task file stores.

vfpt's Fourier prompts are a function of the prompts alone, so once trained they are constants:
the task file holds the transformed ("folded") prompts, its prompt metadata says so
(`folded_from`, the sha256 of the raw prompts, beside the settings and the fraction used: a
record of the file, not a run setting), and every reader (predict,
mixed batches, serving, export) runs the plain prompted forward on them. Training and its
checkpoints keep the raw prompts, so --resume continues exactly.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any

import torch

from vpt_cli.config import PromptConfig


def is_prompt_tensor(name: str) -> bool:
    """`prompts` (L, N, D) or one layer's `prompts.<i>` (N, D_i) of a task's tensors."""
    return name == "prompts" or name.startswith("prompts.")


def prompts_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of the prompt tensors of `state`: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(filter(is_prompt_tensor, state)):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


FOLDED_FROM = "folded_from"  # the task file's prompt metadata key: sha256 of the raw prompts


def fold_task_state(state: dict[str, torch.Tensor],
                    prompt: PromptConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and prompt metadata a task file stores for a model's raw `state`: each layer's
    prompts through the method's transform, as the training forward applies it, and the
    settings with the fraction used and `folded_from`; as they are for a method without one."""
    transform = prompt.info.transform
    if transform is None:
        return state, asdict(prompt)
    fraction = prompt.resolved_fraction
    folded = dict(state)
    for name in filter(is_prompt_tensor, state):
        tensor = state[name].detach()
        folded[name] = (torch.stack([transform(layer, fraction) for layer in tensor]) if name == "prompts"
                        else transform(tensor, fraction))
    return folded, {**asdict(prompt), "fourier_fraction": fraction, FOLDED_FROM: prompts_sha256(state)}
