"""Visual Prompt Tuning (Jia et al., ECCV 2022): prompts at every layer (deep) or the first (shallow)."""
from vpt_cli.methods.base import MethodInfo, register

# This project's choice for VPT-deep; the reference code uses 0.0 (docs/vpt-method.md).
DEEP_PROMPT_DROPOUT = 0.1

VPT_DEEP = register(MethodInfo(
    name="vpt-deep", summary="prompts at every layer (the default)", prompts=True, deep=True,
    default_dropout=DEEP_PROMPT_DROPOUT))
VPT_SHALLOW = register(MethodInfo(
    name="vpt-shallow", summary="prompts before the first layer only", prompts=True))
