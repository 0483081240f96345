"""Serving tasks: load many tasks onto one backbone and answer mixed batches (`load_tasks`); `vpt serve`'s
HTTP app lives in http.py over batcher.py and registry.py (fastapi loads only when they are imported)."""
from vpt_cli.serving.tasks import TaskServer, load_tasks

__all__ = ["TaskServer", "load_tasks"]
