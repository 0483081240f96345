"""The paper's two baselines: a linear probe on frozen features, and a full fine-tune."""
from vpt_cli.methods.base import MethodInfo, register

LINEAR = register(MethodInfo(
    name="linear", summary="the linear probe on frozen features", prompts=False,
    trains_in_epochs=False, stores="head"))
FULL = register(MethodInfo(
    name="full", summary="fine-tune every weight", prompts=False, trains_backbone=True,
    stores="every backbone weight (fine-tuned) + head"))
