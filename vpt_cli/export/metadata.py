"""The metadata an exported file carries, so it is usable without vpt-cli: task names, classes, task types and thresholds, preprocessing."""
from __future__ import annotations

import json
from typing import Any


def export_metadata(names: list[str], infos: list[Any], backbone: Any) -> dict[str, str]:
    """What a user of the exported file needs without vpt-cli: task names, classes, whether each
    task is multi-label (sigmoid scores, a class is present at or over its threshold) and its
    thresholds (null for single-label tasks: softmax), in `task_index` order for a bundle; and
    the preprocessing (size, mean, std, interpolation, crop)."""
    config = backbone.data_config

    def per_task(values: list[Any]) -> str:
        return json.dumps(values[0] if len(values) == 1 else values)

    return {
        "vpt_tasks": json.dumps(names),
        "classes": per_task([info.classes for info in infos]),
        "multi_label": per_task([info.new_objective().multi_label for info in infos]),
        "thresholds": per_task([info.thresholds for info in infos]),
        "image_size": str(backbone.img_size),
        "mean": json.dumps(list(config["mean"])),
        "std": json.dumps(list(config["std"])),
        "interpolation": str(config.get("interpolation", "bicubic")),
        "crop_pct": str(config.get("crop_pct", 1.0)),
        "backbone": backbone.name,
        "input": "images: float32 (batch, 3, image_size, image_size), RGB in [0, 1] normalised by mean/std",
    }
