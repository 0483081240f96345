"""Prometheus metrics of one server, in their own registry (two apps in one process never mix).

Task labels only ever hold names of loaded tasks (or "-" when none applies), never what a client
typed, so a client cannot grow the label set.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], int], loaded_tasks: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vpt_requests", "Requests by route, task and HTTP status.", ["route", "task", "status"],
                                registry=self.registry)
        self.images = Counter("vpt_images", "Images answered, by task.", ["task"], registry=self.registry)
        self.batch_size = Histogram("vpt_batch_size", "(image, task) pairs per backbone forward.",
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("vpt_queue_wait_seconds", "Time a pair waited in the queue before its forward.",
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.forward = Histogram("vpt_forward_seconds", "Time of one batched forward (with top-k).",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        depth = Gauge("vpt_queue_depth", "Pairs waiting for a forward.", registry=self.registry)
        depth.set_function(queue_depth)
        loaded = Gauge("vpt_loaded_tasks", "Tasks served now.", registry=self.registry)
        loaded.set_function(loaded_tasks)

    def on_batch(self, size: int, waits: list[float], forward_s: float) -> None:
        self.batch_size.observe(size)
        self.forward.observe(forward_s)
        for wait in waits:
            self.queue_wait.observe(wait)

    def request(self, route: str, tasks: list[str], status: int) -> None:
        for task in tasks or ["-"]:
            self.requests.labels(route=route, task=task, status=str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
