"""Answering a read request: decode in the thread pool, queue every (image, task) pair on the
batcher, wait for the batched answers within the timeout, and shape the JSON answer."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from vpt_cli.data.images import ImageLoadError, decode_image_bytes
from vpt_cli.methods import get_method
from vpt_cli.serving import schemas
from vpt_cli.serving.batcher import Batcher, Closed, QueueFull
from vpt_cli.serving.metrics import ServeMetrics
from vpt_cli.serving.registry import LiveTasks, ServedTask, Snapshot
from vpt_cli.serving.requests import ApiError
from vpt_cli.serving.settings import ServeSettings


@dataclass
class ServeState:
    """What the routes share: the live task set, the batcher, and readiness."""

    settings: ServeSettings
    live: LiveTasks
    decode_pool: ThreadPoolExecutor
    metrics: ServeMetrics | None = None
    batcher: Batcher | None = None
    ready: bool = False
    failure: BaseException | None = None

    def snapshot(self) -> Snapshot:
        if not self.ready or self.live.current is None or self.batcher is None:
            raise not_ready()
        return self.live.current


def not_ready() -> ApiError:
    """503 with Retry-After while the tasks load: what every route answers before the server is ready."""
    return ApiError(503, "not_ready", "the server is still loading its tasks", {"Retry-After": "1"})


@dataclass
class Decoded:
    """One request image after the thread pool: its tensor, or why it could not be read."""

    filename: Optional[str]
    tensor: Optional[torch.Tensor] = None
    error: Optional[str] = None


async def answer_request(state: ServeState, snapshot: Snapshot, images: list[tuple[Optional[str], bytes]],
                         wanted: list[list[str]], top_k: int | None, started: float) -> schemas.PredictAnswer:
    """Decode in the pool, queue every (image, task) pair, wait for their batched answers (bounded)."""
    try:
        return await asyncio.wait_for(_answer_unbounded(state, snapshot, images, wanted, top_k, started),
                                      state.settings.timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(504, "timeout", f"no answer within {state.settings.timeout_s:g} s (--timeout-s)") from None


async def _answer_unbounded(state: ServeState, snapshot: Snapshot, images: list[tuple[Optional[str], bytes]],
                            wanted: list[list[str]], top_k: int | None, started: float) -> schemas.PredictAnswer:
    loop = asyncio.get_running_loop()
    server = snapshot.server
    decode_started = time.perf_counter()
    decoded = await asyncio.gather(*(loop.run_in_executor(state.decode_pool, _decode, server.transform, name, data)
                                     for name, data in images))
    decode_ms = (time.perf_counter() - decode_started) * 1000
    readable = [i for i, item in enumerate(decoded) if item.tensor is not None]
    if not readable:
        raise ApiError(422, "no_readable_image", f"no image of the request could be read ({decoded[0].error})")
    rows = [(i, name) for i in readable for name in wanted[i]]
    try:
        futures = state.batcher.submit(server, [decoded[i].tensor for i, _ in rows],
                                       [server.names.index(name) for _, name in rows], top_k)
    except QueueFull as exc:
        raise ApiError(503, "queue_full", f"the server is busy: {exc}; retry shortly", {"Retry-After": "1"}) from None
    except Closed as exc:
        raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "1"}) from None
    try:
        answers = await asyncio.gather(*futures)
    except Closed as exc:
        raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "1"}) from None
    finally:
        for future in futures:
            future.cancel()  # a no-op for answered ones; frees queue slots of a cancelled request
    by_image: dict[int, list[schemas.TaskAnswer]] = {}
    for (i, name), answer in zip(rows, answers):
        top = [schemas.Label(label=label, score=score) for label, score in answer.top]
        by_image.setdefault(i, []).append(schemas.TaskAnswer(task=name, top=top))
        state.metrics.images.labels(task=name).inc()
    results = [schemas.ImageAnswer(index=i, filename=item.filename, answers=by_image.get(i, []),
                                   error=schemas.ErrorBody(code="undecodable_image", message=item.error)
                                   if item.error else None)
               for i, item in enumerate(decoded)]
    timing = schemas.Timing(total_ms=(time.perf_counter() - started) * 1000, decode_ms=decode_ms,
                            queue_ms=max(a.queue_s for a in answers) * 1000,
                            forward_ms=max(a.forward_s for a in answers) * 1000,
                            batch_size=max(a.batch_size for a in answers))
    return schemas.PredictAnswer(results=results, backbone=backbone_info(snapshot), version=snapshot.version,
                                 timing=timing)


def _decode(transform: Callable, filename: Optional[str], data: bytes) -> Decoded:
    """In a pool thread: bytes -> the model's input tensor, with the training decode guards."""
    try:
        return Decoded(filename, tensor=transform(decode_image_bytes(data)))
    except ImageLoadError as exc:
        return Decoded(filename, error=exc.reason)


def count_request(state: ServeState, route: str, tasks: list[str], status: int) -> None:
    if state.metrics is not None:
        state.metrics.request(route, tasks, status)


def card(task: ServedTask) -> schemas.TaskCard:
    prompt = task.info.prompt
    return schemas.TaskCard(name=task.name, classes=task.info.classes, method=str(prompt.get("method", "")),
                            prompts=int(prompt.get("num_prompts") or 0) if get_method(prompt["method"]).prompts else 0,
                            created=task.info.provenance.get("created"), sha256=task.sha256)


def backbone_info(snapshot: Snapshot) -> schemas.BackboneInfo:
    backbone = snapshot.server.backbone
    return schemas.BackboneInfo(name=backbone.name, fingerprint=backbone.fingerprint, img_size=backbone.img_size)
