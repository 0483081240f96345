"""What a training method is, as one frozen record per method, and the registry that holds them.

Callers ask a method's `MethodInfo` questions (does it insert prompts? at every layer? does it
train the backbone?) instead of comparing names, so a new method is one module that calls
`register` plus a row in the tests' method matrix (tests/test_methods.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from vpt_cli.core.errors import UsageError

if TYPE_CHECKING:
    import torch

# (one layer's stored prompts (N, D), the method's fraction) -> the prompts that layer sees.
PromptTransform = Callable[["torch.Tensor", float], "torch.Tensor"]


@dataclass(frozen=True)
class MethodInfo:
    """One training method: what it trains, where its prompts go and what its task file stores."""

    name: str = field(metadata={"help": "The name --method and task files use."})
    summary: str = field(metadata={"help": "One line for --help and the README's method table."})
    prompts: bool = field(metadata={"help": "Inserts learned prompt tokens (the sweep searches their count)."})
    deep: bool = field(default=False, metadata={"help": "A prompt set for every layer, else the first layer only."})
    trains_backbone: bool = field(default=False, metadata={"help": "Unfreezes every backbone weight."})
    trains_in_epochs: bool = field(default=True, metadata={
        "help": "Trained by the epoch loop; False: the linear probe's fit on frozen features is the whole run."})
    stores: str = field(default="prompts + head", metadata={"help": "What its task file holds, in words."})
    default_dropout: float = field(default=0.0, metadata={"help": "Prompt dropout when --prompt-dropout is not given."})
    transform: PromptTransform | None = field(default=None, metadata={
        "help": "Turns each layer's stored prompts into what the layer sees; a constant once trained, so task "
        "files store its output (folded) and inference runs the plain forward. None: prompts are used as stored."})
    default_fraction: float | None = field(default=None, metadata={
        "help": "The transform's share of each layer's prompts when --fourier-fraction is not given."})
    transformed_rows: Callable[[int, float], int] | None = field(default=None, metadata={
        "help": "How many leading prompts of a layer (of N, at a fraction) the transform replaces."})

    def __post_init__(self) -> None:
        if self.deep and not self.prompts:
            raise ValueError(f"method {self.name}: deep prompts need prompts")
        if not 0.0 <= self.default_dropout < 1.0:
            raise ValueError(f"method {self.name}: default_dropout must be in [0, 1)")
        parts = (self.transform, self.default_fraction, self.transformed_rows)
        if any(part is not None for part in parts) and not (self.prompts and all(part is not None for part in parts)):
            raise ValueError(f"method {self.name}: a prompt transform needs prompts, a default_fraction and "
                             "transformed_rows")
        if self.default_fraction is not None and not 0.0 <= self.default_fraction <= 1.0:
            raise ValueError(f"method {self.name}: default_fraction must be in [0, 1]")

    def prompt_layers(self, depth: int) -> int:
        """How many layers get their own prompts on a backbone `depth` layers deep."""
        if not self.prompts:
            return 0
        return depth if self.deep else 1


_REGISTRY: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    """Add a method; its module calls this once at import."""
    if info.name in _REGISTRY:
        raise ValueError(f"method {info.name} is registered twice")
    _REGISTRY[info.name] = info
    return info


def get_method(name: str) -> MethodInfo:
    """The registered method called `name`; anything else is a one-line usage error."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UsageError(f"--method must be one of {', '.join(_REGISTRY)}, not '{name}'") from None


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the order --help lists them in)."""
    return tuple(_REGISTRY)
