"""Creating the frozen timm backbone: hub or local weights, fingerprint, data config.

Weights come from timm's own hub code (what users run online) or from a local file
(`--backbone-weights`, first-class for offline machines). Local files are read without
unpickling arbitrary objects: safetensors directly, npz through numpy, .pth/.pt/.bin/.ckpt and
.pth.tar (MoCo v3's release) through `torch.load(weights_only=True)`. Other training code's
layouts are converted (vpt_cli.models.checkpoints), then timm's per-model checkpoint filter adapts
the keys and resamples position embeddings for another image size, exactly as timm does for its
own downloads.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from vpt_cli.config import BackboneConfig
from vpt_cli.config.run import BackboneFacts
from vpt_cli.core.errors import BackboneError, one_line
from vpt_cli.models.adapter import FamilyAdapter
from vpt_cli.models.checkpoints import StateDict, convert_checkpoint, model_tensors
from vpt_cli.models.registry import adapter_for, supported_families, supported_modules

HUB_HOST = "huggingface.co"
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")
WEIGHT_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
_PICKLE_SUFFIXES = WEIGHT_SUFFIXES[2:]  # read by torch.load(weights_only=True)


@dataclass
class Backbone:
    """A frozen timm model with what travels with its weights."""

    model: nn.Module
    adapter: FamilyAdapter  # the family's layout: where prompts go, pooling, patch count
    name: str  # timm name with pretrained tag, e.g. vit_base_patch16_224.augreg_in21k
    fingerprint: str  # hash of the loaded weights; tasks refuse a backbone whose hash differs
    data_config: dict[str, Any]  # timm data config: input_size, mean, std, interpolation, crop
    weights: str | None  # the local weights file, or None for hub weights

    @property
    def img_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    @property
    def facts(self) -> BackboneFacts:
        """What a run's 'auto' settings resolve against (RunConfig.resolve)."""
        return BackboneFacts(name=self.name, num_patches=self.adapter.num_patches, img_size=self.img_size,
                             weights=self.weights, own_pool=self.adapter.own_pool_name())


def check_backbone_name(name: str) -> None:
    """Refuse, from the timm name alone (nothing is built), a model timm does not know or one of a
    family no adapter handles: CNNs and CNN-transformer hybrids have no plain patch tokens."""
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise BackboneError(f"unknown timm model '{name}' (see `timm.list_models('vit_*')`)")
    modules = supported_modules()
    if not any(arch in timm.list_models(module=module) for module in modules):
        raise BackboneError(
            f"'{name}' is not a Vision Transformer of a supported family (CNNs and CNN-transformer hybrids have no "
            f"patch tokens for prompts to join); supported: {', '.join(supported_families())} "
            f"(timm modules {', '.join(modules)})")


def check_weights_file(config: BackboneConfig) -> None:
    """A --backbone-weights file that is missing, unreadable or of an unknown type is refused before
    anything else happens (its tensors are read, and checked, when the backbone is built)."""
    if not config.weights:
        return
    path = Path(config.weights)
    if not path.is_file():
        raise BackboneError(f"--backbone-weights file not found: {path}")
    if not path.name.lower().endswith(WEIGHT_SUFFIXES):
        raise BackboneError(f"unsupported weights file type '{path.suffix}' (use one of {', '.join(WEIGHT_SUFFIXES)})")
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise BackboneError(f"cannot read weights file {path}: {exc.strerror or exc}") from None


def create_backbone(config: BackboneConfig, pretrained: bool = True) -> Backbone:
    """Build `config.name` with weights from `config.weights` or the hub, frozen, in eval mode.

    `pretrained=False` gives random weights (tests, and tiny models made on the spot).
    """
    check_backbone_name(config.name)
    kwargs: dict[str, Any] = dict(config.kwargs, num_classes=0)
    if config.img_size:
        kwargs["img_size"] = config.img_size
    if config.weights:
        model = _create(config.name, False, kwargs)
        adapter = adapter_for(model)  # an unsupported family is refused before any weights are read
        load_weights_file(model, Path(config.weights))
    else:
        model = _create_from_hub(config.name, kwargs) if pretrained else _create(config.name, False, kwargs)
        adapter = adapter_for(model)
    model.requires_grad_(False)
    model.eval()
    height, width = model.patch_embed.img_size
    data_config = resolve_data_config({"input_size": (3, height, width)}, model=model)
    return Backbone(
        model=model,
        adapter=adapter,
        name=config.name,
        fingerprint=weights_fingerprint(model),
        data_config=data_config,
        weights=str(Path(config.weights).resolve()) if config.weights else None,
    )


def check_weights_reachable(config: BackboneConfig) -> None:
    """Fail in seconds, before any data is scanned, when the hub weights `config` needs can be
    neither downloaded (no network) nor found in the local cache; the message names the repo."""
    if config.weights or _hub_resolves():
        return
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    arch = config.name.split(".")[0]
    if not timm.is_model(arch):
        return  # create_backbone says so, in its own words
    pretrained = get_pretrained_cfg(config.name)
    repo = getattr(pretrained, "hf_hub_id", None)
    if repo is None or any(isinstance(try_to_load_from_cache(repo, file), str)
                           for file in ("model.safetensors", "pytorch_model.bin")):
        return
    raise BackboneError(
        f"no network to download '{config.name}' (hub repo {repo}) and it is not in the local cache; "
        f"fetch {repo}/model.safetensors on a connected machine and pass --backbone-weights FILE"
    )


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise BackboneError(f"cannot build '{name}' with {kwargs}: {one_line(exc)}") from None


def _create_from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm's own download path; any failure there becomes one line that names the offline flag."""
    try:
        with _hub_session(offline=not _hub_resolves()):
            return timm.create_model(name, pretrained=True, **kwargs)
    except BackboneError:
        raise
    except Exception as exc:  # network, hub and cache errors come in many types
        reason = one_line(exc).split(". ")[0]
        raise BackboneError(
            f"could not download pretrained weights for '{name}' ({reason}); "
            "on an offline machine pass --backbone-weights FILE"
        ) from None


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves (or a proxy/mirror may reach it for us)."""
    if any(os.environ.get(var) for var in _PROXY_VARIABLES):
        return True
    try:
        socket.getaddrinfo(HUB_HOST, 443)
    except OSError:
        return False
    return True


@contextmanager
def _hub_session(offline: bool) -> Iterator[None]:
    """Silence the hub client's retry warnings; without a network, look in the local cache only.

    With no DNS the hub client retries for about 50 seconds before giving up; its offline mode
    answers from the cache (weights downloaded earlier still load) or fails at once.
    """
    from huggingface_hub import constants

    logger = logging.getLogger("huggingface_hub")
    saved_level, saved_offline = logger.level, constants.HF_HUB_OFFLINE
    logger.setLevel(logging.ERROR)
    constants.HF_HUB_OFFLINE = saved_offline or offline
    try:
        yield
    finally:
        logger.setLevel(saved_level)
        constants.HF_HUB_OFFLINE = saved_offline


def read_state_dict(path: Path) -> StateDict:
    """Tensors of a local checkpoint, unwrapped from common training-script containers."""
    if not path.is_file():
        raise BackboneError(f"--backbone-weights file not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            saved = load_file(str(path))
        elif name.endswith(_PICKLE_SUFFIXES):
            saved = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise BackboneError(f"unsupported weights file type '{path.suffix}' "
                                f"(use one of {', '.join(WEIGHT_SUFFIXES)})")
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(f"cannot read weights file {path}: {one_line(exc)}") from None
    state = model_tensors(saved)
    if state is None:
        raise BackboneError("weights file holds no state dict")
    return state


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load `path` into `model` through timm's checkpoint filter; refuse files that do not fit."""
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise BackboneError(f"--backbone-weights file not found: {path}")
        try:
            model.load_pretrained(str(path))  # timm's JAX/big_vision npz reader (numpy, no pickle)
        except Exception as exc:
            raise BackboneError(f"cannot load npz weights {path}: {one_line(exc)}") from None
        return
    state = convert_checkpoint(read_state_dict(path), model)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:
            raise BackboneError(f"weights in {path} do not fit this model: {one_line(exc)}") from None
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    broken = next((k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
    if broken is not None:
        raise BackboneError(f"weights in {path} hold NaN or infinite values ({broken})")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shape; torch lists every one, the last line says it
        lines = str(exc).strip().splitlines() or ["shape mismatch"]
        raise BackboneError(f"weights in {path} do not fit the chosen --backbone: {lines[-1].strip()[:200]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise BackboneError(
            f"weights in {path} do not fit the chosen --backbone: "
            f"missing {_preview(result.missing_keys)}, unexpected {_preview(result.unexpected_keys)}"
        )


def _preview(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit]) or "none"
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def weights_fingerprint(model: nn.Module) -> str:
    """blake2b over every backbone tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
