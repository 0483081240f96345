"""Visual Fourier Prompt Tuning (Zeng et al., NeurIPS 2024): VPT whose first floor(a * N) prompts
of every layer are replaced by the real part of their 2-D FFT, over the hidden dimension and then
the prompt sequence (docs/vfpt.md).

The transform depends only on the prompts, so once trained it is a constant: a task file stores
the transformed ("folded") prompts, which the plain prompted forward runs at no extra cost.
torch is imported inside the transform, so `vpt --help` (which imports this module) stays fast.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vpt_cli.methods.base import MethodInfo, register
from vpt_cli.methods.vpt import DEEP_PROMPT_DROPOUT

if TYPE_CHECKING:
    import torch

# The authors' code default (MODEL.PROMPT_FOURIER.FOURIER_PERCENTAGE); their paper tunes it per
# task, and `vpt sweep --fourier-fraction 0.25,0.5,1` searches it here.
DEFAULT_FOURIER_FRACTION = 0.5
# floor(N * a) as the authors compute it, but 0.29 * 100 = 28.999999999999996 must count 29.
_ROUNDING = 1e-9


def fourier_count(num_prompts: int, fraction: float) -> int:
    """How many of a layer's `num_prompts` prompts are Fourier prompts: floor(num_prompts * fraction)."""
    return math.floor(num_prompts * fraction + _ROUNDING)


def fourier_prompts(prompts: "torch.Tensor", fraction: float) -> "torch.Tensor":
    """One layer's (N, D) prompts with the first floor(fraction * N) rows P replaced by
    Re(FFT_seq(FFT_hidden(P))) (unnormalised FFTs, as the authors'); the rest pass unchanged,
    and with no Fourier rows the input itself comes back, so fraction 0 is vpt-deep exactly."""
    import torch

    count = fourier_count(prompts.shape[-2], fraction)
    if count == 0:
        return prompts
    mixed = torch.fft.fft(torch.fft.fft(prompts[..., :count, :], dim=-1), dim=-2).real
    return torch.cat([mixed.to(prompts.dtype), prompts[..., count:, :]], dim=-2)


VFPT = register(MethodInfo(
    name="vfpt", summary="vpt-deep with Fourier prompts (--fourier-fraction)", prompts=True, deep=True,
    default_dropout=DEEP_PROMPT_DROPOUT, transform=fourier_prompts, default_fraction=DEFAULT_FOURIER_FRACTION,
    transformed_rows=fourier_count))
VFPT_SHALLOW = register(MethodInfo(
    name="vfpt-shallow", summary="vpt-shallow with Fourier prompts", prompts=True,
    transform=fourier_prompts, default_fraction=DEFAULT_FOURIER_FRACTION, transformed_rows=fourier_count))
