"""The HTTP app of `vpt serve`: FastAPI routes over LiveTasks and the cross-task Batcher.

Untrusted input is bounded before any work: the Guard caps the body while it streams, counts
and names are checked before decoding, decoding runs in a thread pool with the training
pixel guard, and pairs enter the queue only while it has room. Images come only from the
request body: nothing here fetches a URL or opens a path a client names. Every error is
`{"error": {"code", "message"}}`, with no traceback and no server path.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vpt_cli import __version__
from vpt_cli.core.errors import UsageError, VPTError, one_line
from vpt_cli.data.images import ImageLoadError, decode_image_bytes
from vpt_cli.methods import get_method
from vpt_cli.serving import schemas
from vpt_cli.serving.batcher import BATCHING, Batcher, Closed, QueueFull
from vpt_cli.serving.guard import Guard
from vpt_cli.serving.metrics import CONTENT_TYPE, ServeMetrics
from vpt_cli.serving.registry import LiveTasks, ServedTask, Snapshot, UnknownTask

log = logging.getLogger("vpt.serve")
MAX_TOP_K = 100
_ERRORS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
           413: "payload_too_large", 415: "unsupported_media_type", 422: "no_readable_image",
           503: "unavailable", 504: "timeout"}


@dataclass
class ServeSettings:
    """Everything `vpt serve` is told; the defaults are the CLI's."""

    tasks: list[str] = field(default_factory=list)
    all_tasks_dir: Optional[Path] = None  # serve every task file in this folder
    backbone_weights: Optional[str] = None
    device: str = "auto"
    amp: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: Optional[int] = None  # None: TaskServer.auto_batch_size()
    max_wait_ms: float = 5.0
    max_queue: int = 512
    timeout_s: float = 30.0
    max_body_mb: float = 20.0
    max_images: int = 32
    api_key: Optional[str] = None
    cors_origins: list[str] = field(default_factory=list)
    watch: bool = False
    watch_interval_s: float = 2.0
    access_log: bool = False
    workers: int = 4  # decode threads
    drain_timeout_s: float = 10.0
    batching: str = "cross-task"

    def check(self) -> None:
        """Refuse values that would make a limit meaningless, in one line each."""
        bounds = [("--max-batch", self.max_batch is None or self.max_batch >= 1, "at least 1"),
                  ("--max-wait-ms", 0 <= self.max_wait_ms <= 1000, "between 0 and 1000"),
                  ("--max-queue", self.max_queue >= 1, "at least 1"),
                  ("--timeout-s", self.timeout_s > 0, "positive"),
                  ("--max-body-mb", 0 < self.max_body_mb <= 1024, "between 0 and 1024"),
                  ("--max-images", 1 <= self.max_images <= 1024, "between 1 and 1024"),
                  ("--watch-interval-s", 0.1 <= self.watch_interval_s <= 3600, "between 0.1 and 3600"),
                  ("--workers", 1 <= self.workers <= 64, "between 1 and 64"),
                  ("--drain-timeout", self.drain_timeout_s >= 0, "not negative"),
                  ("--port", 0 <= self.port <= 65535, "between 0 and 65535")]
        for flag, ok, rule in bounds:
            if not ok:
                raise UsageError(f"{flag} must be {rule}")
        if self.batching not in BATCHING:
            raise UsageError(f"--batching must be one of {', '.join(BATCHING)}")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


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
            raise ApiError(503, "not_ready", "the server is still loading its tasks", {"Retry-After": "1"})
        return self.live.current


@dataclass
class Decoded:
    """One request image after the thread pool: its tensor, or why it could not be read."""

    filename: Optional[str]
    tensor: Optional[torch.Tensor] = None
    error: Optional[str] = None


# --- the app ---------------------------------------------------------------------------------


def create_app(settings: ServeSettings, live: LiveTasks | None = None,
               on_ready: Callable[[ServeState], None] | None = None,
               on_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app; tasks load in the background at start-up (live answers at once, ready after warm-up)."""
    settings.check()
    live = live or LiveTasks(settings.tasks, settings.all_tasks_dir, settings.backbone_weights, settings.device)
    state = ServeState(settings=settings, live=live,
                       decode_pool=ThreadPoolExecutor(settings.workers, thread_name_prefix="vpt-decode"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        background = [asyncio.create_task(_start(state, on_ready, on_failure), name="vpt-load")]
        if settings.watch:
            background.append(asyncio.create_task(_watch(state), name="vpt-watch"))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            if state.batcher is not None:
                await state.batcher.close(settings.drain_timeout_s)
            state.decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="vpt serve", version=__version__, lifespan=lifespan,
                  description="One frozen backbone answering every loaded VPT task, with cross-task dynamic "
                              "batching. Errors are always {\"error\": {\"code\", \"message\"}}.",
                  responses={code: {"model": schemas.ErrorAnswer} for code in (400, 401, 404, 413, 503, 504)})
    app.state.serve = state
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=int(settings.max_body_mb * 1e6),
                       access_log=settings.access_log)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


async def _start(state: ServeState, on_ready: Callable | None, on_failure: Callable | None) -> None:
    """Load the tasks, run one warm-up forward, start the batcher, then say ready."""
    try:
        for line in await asyncio.to_thread(state.live.load):
            log.warning(line)
        server = state.live.current.server
        await asyncio.to_thread(_warm_up, state.live.current, state.settings.amp)
        state.metrics = ServeMetrics(queue_depth=lambda: state.batcher.depth if state.batcher else 0,
                                     loaded_tasks=lambda: len(state.live.current.tasks) if state.live.current else 0)
        state.batcher = Batcher(max_batch=state.settings.max_batch or server.auto_batch_size(),
                                max_wait_s=state.settings.max_wait_ms / 1000, max_queue=state.settings.max_queue,
                                batching=state.settings.batching, amp=state.settings.amp,
                                on_batch=state.metrics.on_batch)
        state.batcher.start()
    except BaseException as exc:  # noqa: BLE001 - a failed start must stop the server, not hang it
        state.failure = exc
        if on_failure is not None:
            on_failure(exc)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return
    state.ready = True
    if on_ready is not None:
        on_ready(state)


def _warm_up(snapshot: Snapshot, amp: bool) -> None:
    """One forward with every task, so the first request pays no one-off start-up cost."""
    server = snapshot.server
    size = server.backbone.img_size
    count = len(server.names)
    server.logits(torch.zeros(count, 3, size, size), torch.arange(count), amp)


async def _watch(state: ServeState) -> None:
    """Poll the task files (mtime and size) and apply what changed; never stops the server."""
    while True:
        await asyncio.sleep(state.settings.watch_interval_s)
        if not state.ready:
            continue
        try:
            for line in await asyncio.to_thread(state.live.poll):
                log.warning(line)
        except Exception as exc:  # noqa: BLE001 - a bad look at the folder is logged; the next one may work
            log.warning("watch: %s", one_line(exc))


# --- errors -----------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return _error(exc.status_code, _ERRORS.get(exc.status_code, "error"), message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "bad_request", _first_problem(exc.errors()))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, one_line(exc))
        return _error(500, "internal", "internal error; the server log has the details")


def _first_problem(errors: Any) -> str:
    """One line from pydantic's error list: where and what, without echoing the input."""
    errors = list(errors)
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON"
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid"))


# --- routes -----------------------------------------------------------------------------------

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image", "task"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "Image files (repeat the field); encoded bytes, never a URL or path."},
        "task": {"type": "array", "items": {"type": "string"},
                 "description": "One value for all images or one per image; a value may name several tasks "
                                "separated by commas."},
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K,
                  "description": "Classes per image and task; omitted: each task's own answer (single-label: its 3 best classes; multi-label: every label over its threshold)."},
    },
}


def _add_routes(app: FastAPI, state: ServeState) -> None:
    settings = state.settings

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("vpt_cli.serving").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                                                      "style-src 'unsafe-inline'; "
                                                                      "script-src 'unsafe-inline'"})

    @app.post("/v1/predict", response_model=schemas.PredictAnswer, summary="Answer images for one or more tasks",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
                  "application/json": {"schema": schemas.PredictJSON.model_json_schema()}}}})
    async def predict(request: Request) -> schemas.PredictAnswer:
        """Every image is answered for each of its tasks; all pairs of all requests share batched forwards."""
        started = time.perf_counter()
        tasks_seen: list[str] = []
        try:
            snapshot = state.snapshot()
            images, task_fields, top_k = await _read_predict(request, settings.max_images)
            wanted = _tasks_per_image(snapshot, task_fields, len(images))
            tasks_seen = list(dict.fromkeys(name for row in wanted for name in row))
            answer = await _answer(state, snapshot, images, wanted, top_k, started)
        except ApiError as exc:
            _count(state, "predict", tasks_seen, exc.status)
            raise
        _count(state, "predict", tasks_seen, 200)
        return answer

    @app.get("/v1/tasks", response_model=schemas.TasksAnswer, summary="The tasks served now")
    async def tasks() -> schemas.TasksAnswer:
        snapshot = state.snapshot()
        return schemas.TasksAnswer(tasks=[_card(task) for task in snapshot.tasks.values()],
                                   backbone=_backbone(snapshot), version=snapshot.version)

    @app.post("/v1/tasks/{name}/reload", response_model=schemas.ReloadAnswer, summary="Load or replace a task from its file")
    async def reload(name: str) -> schemas.ReloadAnswer:
        """Admin: read the task's file again (or for the first time) and swap it in between batches;
        a file on another backbone is refused with the reason and the served set stays as it was."""
        state.snapshot()
        try:
            served = await asyncio.to_thread(state.live.reload, name)
        except UnknownTask as exc:
            raise ApiError(404, "unknown_task", str(exc)) from None
        except VPTError as exc:
            raise ApiError(409 if exc.exit_code == 5 else 400, "task_refused", one_line(exc, 500)) from None
        log.warning("reloaded task '%s' (API)", name)
        return schemas.ReloadAnswer(task=_card(served), version=state.live.current.version)

    @app.delete("/v1/tasks/{name}", response_model=schemas.UnloadAnswer, summary="Stop serving a task")
    async def unload(name: str) -> schemas.UnloadAnswer:
        """Admin: stop serving the task between batches (its file stays; reload brings it back)."""
        snapshot = state.snapshot()
        try:
            await asyncio.to_thread(state.live.unload, name)
        except UnknownTask:
            raise ApiError(404, "unknown_task", _unknown(name, snapshot)) from None
        except UsageError as exc:
            raise ApiError(409, "last_task", str(exc)) from None
        log.warning("unloaded task '%s' (API)", name)
        return schemas.UnloadAnswer(unloaded=name, version=state.live.current.version)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        if state.metrics is None:
            raise ApiError(503, "not_ready", "the server is still loading its tasks", {"Retry-After": "1"})
        return Response(state.metrics.text(), media_type=CONTENT_TYPE)

    # KServe / open inference protocol v2 ---------------------------------------------------------

    @app.get("/v2", summary="Server metadata (v2)")
    async def server_metadata() -> dict:
        return {"name": "vpt-cli", "version": __version__, "extensions": []}

    @app.get("/v2/health/live", response_model=schemas.Live, summary="Liveness (no key needed)")
    async def live() -> schemas.Live:
        return schemas.Live(live=True)

    @app.get("/v2/health/ready", response_model=schemas.Ready, summary="Readiness (no key needed)")
    async def ready() -> JSONResponse:
        """200 once the weights are loaded and a warm-up forward ran, 503 before."""
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)

    @app.get("/v2/models", response_model=schemas.ModelList, summary="Served tasks as v2 models")
    async def models() -> schemas.ModelList:
        return schemas.ModelList(models=list(state.snapshot().tasks))

    @app.get("/v2/models/{task}", response_model=schemas.ModelMetadata, summary="One task's v2 metadata")
    async def model_metadata(task: str) -> schemas.ModelMetadata:
        served = _served(state.snapshot(), task)
        return schemas.ModelMetadata(
            name=task, versions=[served.sha256[:12]], platform="vpt-cli",
            inputs=[schemas.TensorSpec(name="image", datatype="BYTES", shape=[-1])],
            outputs=[schemas.TensorSpec(name="label", datatype="BYTES", shape=[-1, -1]),
                     schemas.TensorSpec(name="score", datatype="FP32", shape=[-1, -1])])

    @app.get("/v2/models/{task}/ready", response_model=schemas.Ready, summary="Whether one task is served")
    async def model_ready(task: str) -> schemas.Ready:
        _served(state.snapshot(), task)
        return schemas.Ready(ready=True)

    @app.post("/v2/models/{task}/infer", response_model=schemas.InferAnswer, summary="v2 inference")
    async def infer(task: str, body: schemas.InferRequest) -> schemas.InferAnswer:
        """One BYTES input of base64-encoded images; answers label and score tensors of shape [images, k].
        An image that cannot be decoded fails the request (the protocol has no per-image error)."""
        started = time.perf_counter()
        try:
            snapshot = state.snapshot()
            served = _served(snapshot, task)
            images, top_k = _read_infer(body, settings.max_images)
            answer = await _answer(state, snapshot, images, [[task]] * len(images), top_k, started)
            bad = next((result for result in answer.results if result.error), None)
            if bad is not None:
                raise ApiError(422, "undecodable_image", f"image {bad.index}: {bad.error.message}")
        except ApiError as exc:
            loaded = state.live.current is not None and task in state.live.current.tasks
            _count(state, "infer", [task] if loaded else [], exc.status)  # labels hold loaded names only
            raise
        _count(state, "infer", [task], 200)
        k = min(top_k, len(served.info.classes))
        labels = [label.label for result in answer.results for label in result.answers[0].top]
        scores = [label.score for result in answer.results for label in result.answers[0].top]
        shape = [len(images), k]
        return schemas.InferAnswer(model_name=task, model_version=served.sha256[:12], id=body.id, outputs=[
            schemas.InferOutput(name="label", shape=shape, datatype="BYTES", data=labels),
            schemas.InferOutput(name="score", shape=shape, datatype="FP32", data=scores)])


# --- reading requests ---------------------------------------------------------------------------


async def _read_predict(request: Request, max_images: int) -> tuple[list[tuple[Optional[str], bytes]], list[str], int]:
    """(images as (filename, bytes), task fields, top_k) from a multipart or JSON body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise _too_many(max_images) from None
            raise ApiError(400, "bad_multipart", "the multipart body cannot be parsed") from None
        uploads = form.getlist("image")
        if any(isinstance(upload, str) for upload in uploads):
            raise ApiError(400, "bad_request", "'image' fields must be file uploads (images are never fetched "
                                               "from URLs or server paths)")
        if len(uploads) > max_images:
            raise _too_many(max_images)
        images = [(upload.filename, await upload.read()) for upload in uploads]
        tasks = [value for value in form.getlist("task") if isinstance(value, str)]
        top_k = _top_k(form.get("top_k"))
    elif kind == "application/json":
        try:
            raw = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the body is not valid JSON") from None
        if isinstance(raw, dict) and isinstance(raw.get("images"), list) and len(raw["images"]) > max_images:
            raise _too_many(max_images)
        try:
            body = schemas.PredictJSON.model_validate(raw)
        except ValidationError as exc:
            raise ApiError(400, "bad_request", _first_problem(exc.errors())) from None
        images = [(None, _b64(text, index)) for index, text in enumerate(body.images)]
        tasks, top_k = body.tasks, body.top_k
    else:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")
    if not images:
        raise ApiError(400, "no_images", "the request holds no image")
    return images, tasks, top_k


def _read_infer(body: schemas.InferRequest, max_images: int) -> tuple[list[tuple[Optional[str], bytes]], int]:
    inputs = [item for item in body.inputs if item.datatype.upper() == "BYTES"]
    if len(inputs) != 1:
        raise ApiError(400, "bad_request", "send exactly one BYTES input holding the encoded images")
    data = inputs[0].data
    if not data:
        raise ApiError(400, "no_images", "the request holds no image")
    if len(data) > max_images:
        raise _too_many(max_images)
    top_k = _top_k((body.parameters or {}).get("top_k", 5))
    return [(None, _b64(text, index)) for index, text in enumerate(data)], top_k


def _too_many(max_images: int) -> ApiError:
    return ApiError(413, "too_many_images", f"at most {max_images} images per request (--max-images)")


def _top_k(value: Any) -> int | None:
    """A request's top_k; None (not given) is each task's own answer."""
    if value is None:
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_request", "top_k must be an integer") from None
    if not 1 <= k <= MAX_TOP_K:
        raise ApiError(400, "bad_request", f"top_k must be between 1 and {MAX_TOP_K}")
    return k


def _b64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"image {index} is not valid base64") from None


def _tasks_per_image(snapshot: Snapshot, fields: list[str], count: int) -> list[list[str]]:
    """Task names per image: one field for all images or one per image, each 'a' or 'a,b'."""
    if not fields:
        raise ApiError(400, "no_task", f"name a task (loaded: {', '.join(snapshot.tasks)})")
    if len(fields) not in (1, count):
        raise ApiError(400, "bad_request", f"give one task field for all {count} images or one per image, "
                                           f"not {len(fields)}")
    rows = [list(dict.fromkeys(name.strip() for name in field.split(",") if name.strip())) for field in fields]
    if any(not row for row in rows):
        raise ApiError(400, "no_task", "an empty task field")
    for row in rows:
        for name in row:
            _served(snapshot, name)
    return rows * count if len(rows) == 1 else rows


def _served(snapshot: Snapshot, name: str) -> ServedTask:
    if name not in snapshot.tasks:
        raise ApiError(404, "unknown_task", _unknown(name, snapshot))
    return snapshot.tasks[name]


def _unknown(name: str, snapshot: Snapshot) -> str:
    shown = name if len(name) <= 64 and name.isprintable() else name[:64].encode("unicode_escape").decode() + "..."
    return f"task '{shown}' is not loaded (loaded: {', '.join(snapshot.tasks)})"


# --- answering ------------------------------------------------------------------------------


async def _answer(state: ServeState, snapshot: Snapshot, images: list[tuple[Optional[str], bytes]],
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
    return schemas.PredictAnswer(results=results, backbone=_backbone(snapshot), version=snapshot.version, timing=timing)


def _decode(transform: Callable, filename: Optional[str], data: bytes) -> Decoded:
    """In a pool thread: bytes -> the model's input tensor, with the training decode guards."""
    try:
        return Decoded(filename, tensor=transform(decode_image_bytes(data)))
    except ImageLoadError as exc:
        return Decoded(filename, error=exc.reason)


def _count(state: ServeState, route: str, tasks: list[str], status: int) -> None:
    if state.metrics is not None:
        state.metrics.request(route, tasks, status)


def _card(task: ServedTask) -> schemas.TaskCard:
    prompt = task.info.prompt
    return schemas.TaskCard(name=task.name, classes=task.info.classes, method=str(prompt.get("method", "")),
                            prompts=int(prompt.get("num_prompts") or 0) if get_method(prompt["method"]).prompts else 0,
                            created=task.info.provenance.get("created"), sha256=task.sha256)


def _backbone(snapshot: Snapshot) -> schemas.BackboneInfo:
    backbone = snapshot.server.backbone
    return schemas.BackboneInfo(name=backbone.name, fingerprint=backbone.fingerprint, img_size=backbone.img_size)
