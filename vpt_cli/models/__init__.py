"""Prompted models on stock timm backbones: the one prompted forward (`prompted.py`), mixed-task
batches (`multitask.py`), and a family adapter per backbone family (`registry.py`, `vit.py`,
`deit.py`, ...).

Importing the package registers the built-in adapters, so `registry.adapter_for` knows them.
"""
from vpt_cli.models import beit, deit, eva, swin, vit  # noqa: F401  (register their adapters)
