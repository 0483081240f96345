"""Model-sized tensors from PIL images, following the backbone's timm data config."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms

from vpt_cli.config import AUGMENTS
from vpt_cli.core.errors import UsageError

_DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
CROP_MIN_AREA = 0.5  # the "crop" augment's smallest crop, as a fraction of the image


def build_transform(
    data_config: dict[str, Any], train: bool, augment: str = "flip"
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised tensor, following the backbone's timm data config.

    Eval (and augment "none") is timm's resize + center crop. "flip" adds only a random
    horizontal flip, which measured best on small folders; "crop" adds a mild random resized crop.
    """
    if augment not in AUGMENTS:
        raise UsageError(f"augment must be one of {', '.join(AUGMENTS)}, not '{augment}'")
    config = {key: data_config[key] for key in _DATA_CONFIG_KEYS if key in data_config}
    if train and augment == "crop":
        return create_transform(
            **config, is_training=True, scale=(CROP_MIN_AREA, 1.0), hflip=0.5, color_jitter=None, auto_augment=None
        )
    eval_transform = create_transform(**config, is_training=False)
    if not train or augment == "none":
        return eval_transform
    steps = list(eval_transform.transforms)
    to_tensor = next(i for i, s in enumerate(steps) if type(s).__name__ in ("MaybeToTensor", "ToTensor"))
    steps.insert(to_tensor, transforms.RandomHorizontalFlip(0.5))
    return transforms.Compose(steps)


def decode_size(data_config: dict[str, Any], train: bool = False, augment: str = "none") -> int:
    """The short side an image must keep for the transforms to lose nothing: the eval resize
    (input size / crop_pct), or for random crops down to CROP_MIN_AREA of the image, enough that
    the smallest crop still covers the input size."""
    size = data_config["input_size"][-1]
    needed = math.ceil(size / data_config.get("crop_pct", 1.0))
    if train and augment == "crop":
        needed = max(needed, math.ceil(size / math.sqrt(CROP_MIN_AREA)))
    return needed
