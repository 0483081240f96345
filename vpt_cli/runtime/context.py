"""Where and how a run computes and reports, as one frozen value: the device, mixed precision,
and the reporter that progress goes to. The epoch loop, the probe and evaluation take it whole
instead of three arguments each."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vpt_cli.runtime.device import autocast
from vpt_cli.runtime.reporting import Reporter


@dataclass(frozen=True)
class RunContext:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False  # bf16 (fp16 on GPUs without bf16) autocast around forwards
    reporter: Reporter = field(default_factory=Reporter)

    def autocast(self):
        """Mixed precision on this device when `amp`, else nothing."""
        return autocast(self.device, self.amp)
