"""Prompted models on stock timm backbones: the one prompted forward (`prompted.py`), mixed-task
batches (`multitask.py`), and a family adapter per backbone family (`registry.py`, `vit.py`)."""
