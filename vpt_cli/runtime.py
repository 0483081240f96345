"""Where and how the loops run: device choice, mixed precision, seeding."""
from __future__ import annotations

import contextlib
import random

import torch

from vpt_cli.errors import UsageError


def pick_device(name: str) -> torch.device:
    """'auto' prefers CUDA, then Apple MPS, then CPU; an unavailable explicit choice is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available.get(name, False):
        raise UsageError(f"--device {name} is not available on this machine (try --device auto)")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device supports it, fp16 on older GPUs; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
