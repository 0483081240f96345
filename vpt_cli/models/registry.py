"""Which family adapter knows a timm model's layout.

A family adapter answers every question the prompted forward asks of a backbone: how tokens are
embedded and positioned, how many prefix tokens come first, which layers run, which output rows
anything reads, and how the final tokens are pooled. Everything above this package (engine,
serving, export, the API) talks to backbones only through an adapter, so a new family is one
adapter module registered here, and nothing else changes.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from timm.layers import PatchEmbed
from torch import nn

from vpt_cli.core.errors import BackboneError
from vpt_cli.models.adapter import FamilyAdapter

A = TypeVar("A", bound=type[FamilyAdapter])

# timm model class -> adapter class, in registration order (a subclass is matched exactly first).
_ADAPTERS: dict[type[nn.Module], type[FamilyAdapter]] = {}


def register_adapter(*model_classes: type[nn.Module]) -> Callable[[A], A]:
    """Class decorator: `adapter_cls` handles models of exactly these timm classes."""

    def register(adapter_cls: A) -> A:
        for model_class in model_classes:
            _ADAPTERS[model_class] = adapter_cls
        return adapter_cls

    return register


def supported_families() -> list[str]:
    return sorted({adapter.family for adapter in _ADAPTERS.values()})


def supported_modules() -> list[str]:
    """The timm modules (e.g. vision_transformer, swin_transformer) whose classes have an adapter."""
    return sorted({model_class.__module__.rpartition(".")[2] for model_class in _ADAPTERS})


def adapter_class_for(model_class: type) -> type[FamilyAdapter] | None:
    """The adapter registered for `model_class` itself (subclasses may change the layout, so they
    must be registered on their own)."""
    return _ADAPTERS.get(model_class)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for `model`, or a BackboneError naming the supported families."""
    adapter_cls = adapter_class_for(type(model))
    if adapter_cls is None:
        raise BackboneError(
            f"{type(model).__name__} ({type(model).__module__}) is not a supported backbone family; "
            f"supported: {', '.join(supported_families())}"
        )
    stem = getattr(model, "patch_embed", None)
    if not isinstance(stem, PatchEmbed):  # a CNN stem: its "patches" are feature-map cells
        raise BackboneError(f"{type(model).__name__} with a {type(stem).__name__} stem (a CNN-transformer hybrid) "
                            "is not supported; prompts need patch tokens of a plain patch embedding")
    return adapter_cls(model)
