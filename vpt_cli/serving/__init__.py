"""Serving tasks: load many tasks onto one backbone and answer mixed batches (`load_tasks`)."""
from vpt_cli.serving.tasks import TaskServer, load_tasks

__all__ = ["TaskServer", "load_tasks"]
