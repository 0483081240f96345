"""The task file: one safetensors file with the trained tensors and JSON metadata.

Tensors (prompts, optional projection, head; a full fine-tune adds the backbone) are stored
under the names `PromptedViT.task_state_dict()` gives them. Everything else a task needs to be
rebuilt on a standard timm backbone lives in the safetensors string metadata under "vpt_task"
(see README, "The task file").

Task files are shared, so each one is input from a stranger: `read_task_info` checks every
metadata field (types, ranges, lengths, safe names, printable class names, only the backbone
arguments a family takes, within bounds that keep the model small) and `load_task` checks every
tensor (names, dtypes, shapes against the metadata, finite values) before anything uses them;
anything else is one TaskError line (exit 5). Nothing is unpickled; metadata is read straight
from the safetensors header without torch, so listing tasks is instant. Writes are atomic.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vpt_cli.artifact.home import NAME_PATTERN
from vpt_cli.config import METHODS, POOLS, PROMPT_INITS, PromptConfig
from vpt_cli.core.errors import TaskError, one_line
from vpt_cli.core.fileio import write_bytes
from vpt_cli.methods import get_method
from vpt_cli.objectives import SINGLE_LABEL, Objective, is_multi_label, objective_class, objective_names

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
METADATA_KEY = "vpt_task"
_MAX_HEADER_BYTES = 16 * 2**20  # a task's header is a few KB; anything near this is not a task
_MAX_IMG_SIZE = 2048
_MAX_CLASSES = 100_000
_MAX_CLASS_NAME = 200
_MAX_PROMPTS = 1024
_MAX_PARAMS = 3.5e8  # ~ViT-L: backbone_kwargs in a task file cannot make us build a bigger model
_BACKBONE_NAME = re.compile(r"^[a-z0-9_]{1,100}(\.[A-Za-z0-9_-]{1,60})?$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LAYER_PROMPTS = re.compile(r"^prompts\.[0-9]{1,3}$")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
_CROP_MODES = ("center", "squash", "border")
_TENSOR_DTYPES = ("F16", "BF16", "F32", "F64")
# Constructor arguments a task may pass to its timm backbone, with the values each may take.
_INT_RANGES = {"patch_size": (1, 64), "embed_dim": (8, 4096), "depth": (1, 64), "num_heads": (1, 64),
               "reg_tokens": (0, 64), "window_size": (1, 64), "num_classes": (0, 0)}
_INT_LIST_RANGES = {"depths": (1, 64), "num_heads": (1, 64)}
_FLOAT_RANGES = {"mlp_ratio": (0.25, 16.0), "drop_rate": (0.0, 1.0), "pos_drop_rate": (0.0, 1.0),
                 "proj_drop_rate": (0.0, 1.0), "attn_drop_rate": (0.0, 1.0), "drop_path_rate": (0.0, 1.0),
                 "init_values": (0.0, 10.0)}
_BOOLS = ("class_token", "qkv_bias", "qk_norm", "no_embed_class", "fc_norm", "dynamic_img_size",
          "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias", "use_rot_pos_emb", "swiglu_mlp",
          "scale_mlp", "ape", "pre_norm")
_CHOICES = {"global_pool": ("", "token", "avg", "avgmax", "max", "map", "avg_token")}


@dataclass
class TaskInfo:
    """What a task file says about itself, besides its tensors."""

    name: str
    backbone: str  # timm name with pretrained tag
    backbone_fingerprint: str
    img_size: int
    data_config: dict[str, Any]  # mean, std, interpolation, crop_pct, crop_mode, input_size
    prompt: dict[str, Any]  # PromptConfig fields: method, num_prompts, dropout, proj_dim
    classes: list[str]
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None  # local file used in training, reused when it still exists
    metrics: dict[str, Any] = field(default_factory=dict)  # validation metrics of the kept epoch
    provenance: dict[str, Any] = field(default_factory=dict)  # data, split, seed, config, versions
    format_version: int = FORMAT_VERSION
    objective: str = SINGLE_LABEL  # the task type (vpt_cli.objectives); files from before it are single-label
    thresholds: list[float] | None = None  # multi-label tasks: each class's score threshold, in [0, 1]

    def new_objective(self) -> Objective:
        """The task type this task answers with, with its stored thresholds (inference needs no
        class balance or loss: they shape training only)."""
        return objective_class(self.objective).from_task(self.thresholds)


@dataclass
class Task:
    info: TaskInfo
    tensors: dict[str, "torch.Tensor"]
    path: Path | None = None

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path and self.path.exists() else 0


def save_task(task: Task, path: Path, force: bool = False) -> Path:
    """Write `task` to `path` atomically; refuse to replace an existing file unless `force`."""
    from safetensors.torch import save

    path = Path(path)
    if path.exists() and not force:
        raise TaskError(f"task file {path} already exists; pass --force to overwrite it")
    metadata = {METADATA_KEY: json.dumps(asdict(task.info), sort_keys=True), "format": "vpt-task"}
    tensors = {name: t.detach().cpu().contiguous() for name, t in task.tensors.items()}
    write_bytes(path, save(tensors, metadata=metadata))
    task.path = path
    return path


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, `__metadata__`),
    read with plain file I/O: no torch, no tensor bytes."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= min(_MAX_HEADER_BYTES, os.fstat(handle.fileno()).st_size - 8):
                raise ValueError("no safetensors header")
            header = json.loads(handle.read(size))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TaskError(f"{path} is not a readable task file ({one_line(exc, 120)})") from None
    if not isinstance(header, dict):
        raise TaskError(f"{path} is not a readable task file (its header is not a JSON object)")
    return header


def read_task_info(path: Path) -> TaskInfo:
    """The checked metadata of a task file (cheap: tensors are not read)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[TaskInfo, dict[str, Any]]:
    """(checked metadata, the header's tensor entries) of a task file."""
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise TaskError(f"{path} is a safetensors file but not a vpt task (no '{METADATA_KEY}' metadata)")
    try:
        raw = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError):
        raise TaskError(f"{path} has unreadable task metadata (not JSON)") from None
    try:
        return _check_info(raw), header
    except _Invalid as exc:
        raise TaskError(f"{path} is not a valid task file: {exc}") from None


def load_task(path: Path) -> Task:
    """Read and check a task file; anything missing, foreign, newer or malformed is a TaskError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    info, entries = _read(path)
    try:
        _check_tensor_entries(info, entries)
        tensors = load_file(str(path))
    except _Invalid as exc:
        raise TaskError(f"{path} is not a valid task file: {exc}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TaskError(f"{path} is not a readable task file ({one_line(exc, 120)})") from None
    bad = [name for name, tensor in tensors.items() if not bool(tensor.isfinite().all())]
    if bad:
        raise TaskError(f"{path} is not a valid task file: tensor {bad[0]} holds NaN or infinite values")
    return Task(info=info, tensors=tensors, path=path)


# --- validation ----------------------------------------------------------------------------


class _Invalid(Exception):
    """One field of a task file is unusable; the message names it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise _Invalid(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(name: str, value: Any, low: int, high: int) -> None:
    _require(_is_int(value) and low <= value <= high, f"{name} must be an integer in [{low}, {high}]")


def _float_in(name: str, value: Any, low: float, high: float) -> None:
    _require(_is_number(value) and low <= value <= high, f"{name} must be a number in [{low}, {high}]")


def _check_info(raw: Any) -> TaskInfo:
    """TaskInfo from untrusted JSON, every field checked (see module doc)."""
    _require(isinstance(raw, dict), "metadata is not a JSON object")
    version = raw.get("format_version", 0)
    _require(_is_int(version), "format_version must be an integer")
    _require(version <= FORMAT_VERSION,
             f"it uses task format {version}, newer than this vpt-cli reads ({FORMAT_VERSION}); please upgrade")
    known = {f.name for f in TaskInfo.__dataclass_fields__.values()}
    missing = [name for name in ("name", "backbone", "backbone_fingerprint", "img_size", "data_config", "prompt",
                                 "classes") if name not in raw]
    _require(not missing, f"missing {', '.join(missing)}")
    checks: dict[str, Callable[[Any], None]] = {
        "name": lambda v: _require(isinstance(v, str) and bool(NAME_PATTERN.match(v)), "name is not a valid task name"),
        "backbone": lambda v: _require(isinstance(v, str) and bool(_BACKBONE_NAME.match(v)),
                                       "backbone is not a timm model name"),
        "backbone_fingerprint": lambda v: _require(isinstance(v, str) and bool(_FINGERPRINT.match(v)),
                                                   "backbone_fingerprint is not a 32-digit hex digest"),
        "img_size": lambda v: _int_in("img_size", v, 8, _MAX_IMG_SIZE),
        "data_config": _check_data_config,
        "prompt": _check_prompt,
        "classes": _check_classes,
        "backbone_kwargs": _check_backbone_kwargs,
        "backbone_weights": lambda v: _require(v is None or (isinstance(v, str) and 0 < len(v) <= 4096 and "\0" not in v),
                                               "backbone_weights must be a path or null"),
        "metrics": _check_metrics,
        "provenance": lambda v: _require(isinstance(v, dict), "provenance must be an object"),
        "objective": lambda v: _require(v in objective_names(), f"objective must be one of {', '.join(objective_names())}"),
    }
    for name, check in checks.items():
        if name in raw:
            check(raw[name])
    _check_thresholds(raw.get("thresholds"), raw.get("objective", SINGLE_LABEL), len(raw["classes"]))
    return TaskInfo(**{k: v for k, v in raw.items() if k in known})


def _check_thresholds(thresholds: Any, objective: str, classes: int) -> None:
    """A multi-label task has one threshold in [0, 1] per class; other task types have none."""
    if not is_multi_label(objective):
        _require(thresholds is None, f"thresholds are only for multi-label tasks, not {objective}")
        return
    _require(isinstance(thresholds, list) and len(thresholds) == classes
             and all(_is_number(t) and 0.0 <= t <= 1.0 for t in thresholds),
             f"thresholds must be {classes} numbers in [0, 1], one per class")


def _check_data_config(config: Any) -> None:
    _require(isinstance(config, dict), "data_config must be an object")
    allowed = {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
    _require(set(config) <= allowed, f"data_config has unknown keys {sorted(set(config) - allowed)[:3]}")
    size = config.get("input_size")
    _require(isinstance(size, list) and len(size) == 3 and size[0] == 3
             and all(_is_int(v) and 8 <= v <= _MAX_IMG_SIZE for v in size[1:]),
             f"data_config.input_size must be [3, H, W] with H, W in [8, {_MAX_IMG_SIZE}]")
    for key in ("mean", "std"):
        value = config.get(key)
        _require(isinstance(value, list) and len(value) == 3 and all(_is_number(v) and abs(v) <= 1e3 for v in value),
                 f"data_config.{key} must be 3 finite numbers")
    _require(all(v > 0 for v in config["std"]), "data_config.std must be positive")
    _require(config.get("interpolation", "bicubic") in _INTERPOLATIONS,
             f"data_config.interpolation must be one of {', '.join(_INTERPOLATIONS)}")
    if "crop_pct" in config:
        _float_in("data_config.crop_pct", config["crop_pct"], 0.05, 2.0)
    _require(config.get("crop_mode", "center") in _CROP_MODES, f"data_config.crop_mode must be one of {_CROP_MODES}")


def _check_prompt(prompt: Any) -> None:
    _require(isinstance(prompt, dict), "prompt must be an object")
    allowed = set(PromptConfig.__dataclass_fields__) | {"folded_from"}  # models/folding.py writes it
    _require(set(prompt) <= allowed, f"prompt has unknown keys {sorted(set(prompt) - allowed)[:3]}")
    _require(prompt.get("method") in METHODS, f"prompt.method must be one of {', '.join(METHODS)}")
    method = get_method(prompt["method"])
    if method.prompts:
        _int_in("prompt.num_prompts", prompt.get("num_prompts"), 1, _MAX_PROMPTS)
    elif prompt.get("num_prompts") is not None:
        _int_in("prompt.num_prompts", prompt["num_prompts"], 0, _MAX_PROMPTS)
    if prompt.get("dropout") is not None:
        _float_in("prompt.dropout", prompt["dropout"], 0.0, 0.99)
    _int_in("prompt.proj_dim", prompt.get("proj_dim", 0), 0, 4096)
    _require(prompt.get("init", "tokens") in PROMPT_INITS, f"prompt.init must be one of {', '.join(PROMPT_INITS)}")
    _require(prompt.get("pool") in (None, *POOLS), f"prompt.pool must be one of {', '.join(POOLS)} or null")
    if method.transform is not None:  # the stored prompts are the transform's output (models/folding.py)
        _float_in("prompt.fourier_fraction", prompt.get("fourier_fraction"), 0.0, 1.0)
        _require(isinstance(prompt.get("folded_from"), str) and bool(_SHA256.match(prompt["folded_from"])),
                 f"prompt.folded_from must be the sha256 of the raw prompts (a {method.name} task stores "
                 "folded prompts)")
    else:
        _require(prompt.get("fourier_fraction") in (None, 0) and prompt.get("folded_from") is None,
                 f"prompt.fourier_fraction and prompt.folded_from are for Fourier prompts, not {method.name}")
    for key, value in prompt.items():  # fields added later: plain short values only
        _require(value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 64),
                 f"prompt.{key} has an unusable value")


def _check_classes(classes: Any) -> None:
    _require(isinstance(classes, list) and 1 <= len(classes) <= _MAX_CLASSES,
             f"classes must be a list of 1 to {_MAX_CLASSES} names")
    for name in classes:
        _require(isinstance(name, str) and 0 < len(name) <= _MAX_CLASS_NAME and name.isprintable(),
                 f"class names must be printable text of 1 to {_MAX_CLASS_NAME} characters")
    _require(len(set(classes)) == len(classes), "class names must be unique")


def _check_backbone_kwargs(kwargs: Any) -> None:
    """Only arguments the supported families take, in ranges that keep the model buildable."""
    _require(isinstance(kwargs, dict), "backbone_kwargs must be an object")
    for key, value in kwargs.items():
        where = f"backbone_kwargs.{key}"
        if key in _INT_LIST_RANGES and isinstance(value, list):
            low, high = _INT_LIST_RANGES[key]
            _require(0 < len(value) <= 8 and all(_is_int(v) and low <= v <= high for v in value),
                     f"{where} must be 1 to 8 integers in [{low}, {high}]")
        elif key in _INT_RANGES:
            _int_in(where, value, *_INT_RANGES[key])
        elif key in _FLOAT_RANGES:
            _float_in(where, value, *_FLOAT_RANGES[key])
        elif key in _BOOLS:
            _require(isinstance(value, bool) or value is None, f"{where} must be true, false or null")
        elif key in _CHOICES:
            _require(value in _CHOICES[key], f"{where} must be one of {_CHOICES[key]}")
        else:
            raise _Invalid(f"backbone_kwargs has an argument no supported family takes from a task file: {key[:40]!r}")
    depth = sum(kwargs["depths"]) if isinstance(kwargs.get("depths"), list) else kwargs.get("depth", 12)
    width = kwargs.get("embed_dim", 768)
    ratio = kwargs.get("mlp_ratio", 4.0)
    _require(depth * (4 + 2 * ratio) * width * width <= _MAX_PARAMS,
             "backbone_kwargs describe a model too large to build from a task file")


def _check_metrics(metrics: Any) -> None:
    _require(isinstance(metrics, dict) and len(metrics) <= 64, "metrics must be an object")
    for key, value in metrics.items():
        _require(len(key) <= 64 and (value is None or _is_number(value)), f"metrics.{key[:40]} must be a finite number")


def _check_tensor_entries(info: TaskInfo, entries: dict[str, Any]) -> None:
    """Tensor names, dtypes and shapes from the header, against what the metadata promises."""
    method = info.prompt["method"]
    trains = get_method(method)
    allowed = {"prompts", "prompt_proj.weight", "prompt_proj.bias", "head.weight", "head.bias"}
    for name, entry in entries.items():
        _require(name in allowed or bool(_LAYER_PROMPTS.match(name)) or (trains.trains_backbone and name.startswith("backbone.")),
                 f"unexpected tensor {name[:60]!r} for a {method} task")
        _require(isinstance(entry, dict) and entry.get("dtype") in _TENSOR_DTYPES,
                 f"tensor {name[:60]} must be a float tensor ({', '.join(_TENSOR_DTYPES)})")
    shape = {name: entry.get("shape") for name, entry in entries.items()}
    classes = len(info.classes)
    _require(isinstance(shape.get("head.weight"), list) and len(shape["head.weight"]) == 2
             and shape["head.weight"][0] == classes, f"head.weight must have one row per class ({classes})")
    _require(shape.get("head.bias") == [classes], f"head.bias must have one entry per class ({classes})")
    count = info.prompt.get("num_prompts")
    per_layer = sorted((int(name.split(".")[1]), shape[name]) for name in shape if _LAYER_PROMPTS.match(name))
    if trains.prompts and per_layer:  # backbones whose width changes by stage (Swin)
        _require("prompts" not in shape and [layer for layer, _ in per_layer] == list(range(len(per_layer)))
                 and all(isinstance(s, list) and len(s) == 2 and s[0] == count for _, s in per_layer)
                 and (trains.deep or len(per_layer) == 1),
                 f"prompts.0, prompts.1, ... must each have shape ({count}, width) for {method}")
    elif trains.prompts:
        prompts = shape.get("prompts")
        _require(isinstance(prompts, list) and len(prompts) == 3 and prompts[1] == count
                 and prompts[0] >= 1 and (trains.deep or prompts[0] == 1),
                 f"prompts must have shape (layers, {count}, width) for {method}")
    else:
        _require("prompts" not in shape and not per_layer, f"a {method} task holds no prompts")
