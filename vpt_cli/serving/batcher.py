"""Cross-task dynamic batching: (image, task) pairs from any requests share one MultiTaskViT forward.

Requests put decoded pairs in one queue, whatever their task. A batch closes when it holds
`max_batch` pairs or `max_wait_s` after its oldest pair arrived, and is answered by ONE forward
with a per-pair task index, on a single model thread, so the event loop never waits on torch and
the next batch fills (and its images decode, in the caller's thread pool) while this one runs.
A lone request on an idle server waits at most `max_wait_s`; one that arrives while a forward
runs has already waited that long when it ends, so the next batch leaves at once.

`batching` is for comparison (benchmarks/serve_http.py): "per-task" lets a batch hold one task
only, as servers that batch per model do, and "none" answers each pair on its own.
Pairs of different snapshots (a task set swapped mid-flight) never share a forward.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from vpt_cli.serving.tasks import TaskServer, TopK

BATCHING = ("cross-task", "per-task", "none")

# Called after each forward with (pairs in the batch, each pair's queue wait in s, forward s).
BatchHook = Callable[[int, list[float], float], None]


class QueueFull(Exception):
    """More pairs are waiting than the queue may hold; the caller answers 503."""


class Closed(Exception):
    """The batcher is draining for shutdown and takes no new pairs."""


@dataclass
class Pair:
    """One image to answer for one task of one server version, and where its answer goes."""

    image: torch.Tensor  # transformed (3, H, W)
    task: int  # index into server.names
    top_k: int | None  # None: the task's own answer
    server: TaskServer
    future: asyncio.Future = field(repr=False)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Answer:
    top: TopK
    queue_s: float
    forward_s: float
    batch_size: int


class Batcher:
    """The queue and its batching loop; `submit` from the event loop, `start`/`close` around serving."""

    def __init__(self, *, max_batch: int, max_wait_s: float, max_queue: int, batching: str = "cross-task",
                 amp: bool = False, on_batch: BatchHook | None = None) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, not {batching!r}")
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be at least 1 and max_wait_s not negative")
        self.max_batch = 1 if batching == "none" else max_batch
        self.max_wait_s, self.max_queue, self.batching, self.amp = max_wait_s, max_queue, batching, amp
        self._on_batch = on_batch
        self._pending: deque[Pair] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vpt-model")
        self._loop_task: asyncio.Task | None = None
        self.forwards = 0

    @property
    def depth(self) -> int:
        """Pairs waiting for a forward (those of timed-out requests until the loop drops them)."""
        return len(self._pending)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="vpt-batcher")

    def submit(self, server: TaskServer, images: list[torch.Tensor], tasks: list[int], top_k: int | None) -> list[asyncio.Future]:
        """Queue pairs (images[i], tasks[i]) -> one future per pair, resolving to an Answer."""
        if self._closing:
            raise Closed("the server is shutting down")
        if len(self._pending) + len(images) > self.max_queue:
            raise QueueFull(f"{len(self._pending)} images are waiting (at most {self.max_queue})")
        loop = asyncio.get_running_loop()
        pairs = [Pair(image, task, top_k, server, loop.create_future()) for image, task in zip(images, tasks)]
        self._pending.extend(pairs)
        self._wake.set()
        return [pair.future for pair in pairs]

    async def close(self, timeout_s: float) -> None:
        """Take no more pairs, answer those queued (for at most `timeout_s`), stop the model thread."""
        self._closing = True
        self._wake.set()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(self._loop_task, timeout_s)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._loop_task.cancel()
        for pair in self._pending:
            if not pair.future.done():
                pair.future.set_exception(Closed("the server shut down before this image was answered"))
        self._pending.clear()
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    def _key(self, pair: Pair) -> tuple[int, int]:
        """Pairs with equal keys may share a forward: same server version (and same task per-task)."""
        return id(pair.server), pair.task if self.batching == "per-task" else -1

    def _matching(self, key: tuple[int, int]) -> int:
        return sum(1 for pair in self._pending if self._key(pair) == key and not pair.future.done())

    def _take(self, key: tuple[int, int]) -> list[Pair]:
        """Remove up to max_batch live pairs with `key` (oldest first); drop cancelled ones on the way."""
        batch, kept = [], deque()
        while self._pending:
            pair = self._pending.popleft()
            if pair.future.done():
                continue
            if len(batch) < self.max_batch and self._key(pair) == key:
                batch.append(pair)
            else:
                kept.append(pair)
        self._pending = kept
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            key = self._key(self._pending[0])
            deadline = self._pending[0].enqueued + self.max_wait_s
            while not self._closing and self._matching(key) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take(key)
            if batch:
                await self._answer(loop, batch)

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[Pair]) -> None:
        started = time.perf_counter()
        try:
            tops, forward_s = await loop.run_in_executor(self._model_thread, self._forward, batch)
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
            for pair in batch:
                if not pair.future.done():
                    pair.future.set_exception(exc)
            return
        self.forwards += 1
        waits = [started - pair.enqueued for pair in batch]
        for pair, top, wait in zip(batch, tops, waits):
            if not pair.future.done():
                pair.future.set_result(Answer(top, wait, forward_s, len(batch)))
        if self._on_batch is not None:
            self._on_batch(len(batch), waits, forward_s)

    def _forward(self, batch: list[Pair]) -> tuple[list[TopK], float]:
        """On the model thread: one forward for the whole batch, then each pair's own top-k."""
        started = time.perf_counter()
        server = batch[0].server
        images = torch.stack([pair.image for pair in batch])
        task_index = torch.tensor([pair.task for pair in batch])
        logits = server.logits(images, task_index, self.amp)
        tops = server.top_k_each(logits, task_index, [pair.top_k for pair in batch])
        return tops, time.perf_counter() - started
