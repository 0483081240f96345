"""vpt-cli: Visual Prompt Tuning for pretrained timm Vision Transformers.

The package root stays import-light (no torch) so that `vpt --help` starts instantly; import the
library API from its modules, e.g. `from vpt_cli.api import train`.
"""

__version__ = "0.1.0"
