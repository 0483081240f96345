"""The HTTP app of `vpt serve`: start-up, routes and error handling over LiveTasks and the cross-task Batcher
(requests are read in `requests.py`, answered in `answering.py`).

Untrusted input is bounded before any work: the Guard caps the body while it streams, counts
and names are checked before decoding, decoding runs in a thread pool with the training
pixel guard, and pairs enter the queue only while it has room. Images come only from the
request body: nothing here fetches a URL or opens a path a client names. Every error is
`{"error": {"code", "message"}}`, with no traceback and no server path.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from vpt_cli import __version__
from vpt_cli.core.errors import UsageError, VPTError, one_line
from vpt_cli.serving import schemas
from vpt_cli.serving.answering import ServeState, answer_request, backbone_info, card, count_request, not_ready
from vpt_cli.serving.batcher import Batcher
from vpt_cli.serving.guard import Guard
from vpt_cli.serving.metrics import CONTENT_TYPE, ServeMetrics
from vpt_cli.serving.registry import LiveTasks, Snapshot, UnknownTask
from vpt_cli.serving.requests import (
    MULTIPART_SCHEMA,
    ApiError,
    first_problem,
    read_infer,
    read_predict,
    served_task,
    tasks_per_image,
    unknown_task,
)
from vpt_cli.serving.settings import ServeSettings

log = logging.getLogger("vpt.serve")
_ERRORS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
           413: "payload_too_large", 415: "unsupported_media_type", 422: "no_readable_image",
           503: "unavailable", 504: "timeout"}


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
        return _error(400, "bad_request", first_problem(exc.errors()))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, one_line(exc))
        return _error(500, "internal", "internal error; the server log has the details")


# --- routes -----------------------------------------------------------------------------------

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
                  "multipart/form-data": {"schema": MULTIPART_SCHEMA},
                  "application/json": {"schema": schemas.PredictJSON.model_json_schema()}}}})
    async def predict(request: Request) -> schemas.PredictAnswer:
        """Every image is answered for each of its tasks; all pairs of all requests share batched forwards."""
        started = time.perf_counter()
        tasks_seen: list[str] = []
        try:
            snapshot = state.snapshot()
            images, task_fields, top_k = await read_predict(request, settings.max_images)
            wanted = tasks_per_image(snapshot, task_fields, len(images))
            tasks_seen = list(dict.fromkeys(name for row in wanted for name in row))
            answer = await answer_request(state, snapshot, images, wanted, top_k, started)
        except ApiError as exc:
            count_request(state, "predict", tasks_seen, exc.status)
            raise
        count_request(state, "predict", tasks_seen, 200)
        return answer

    @app.get("/v1/tasks", response_model=schemas.TasksAnswer, summary="The tasks served now")
    async def tasks() -> schemas.TasksAnswer:
        snapshot = state.snapshot()
        return schemas.TasksAnswer(tasks=[card(task) for task in snapshot.tasks.values()],
                                   backbone=backbone_info(snapshot), version=snapshot.version)

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
        return schemas.ReloadAnswer(task=card(served), version=state.live.current.version)

    @app.delete("/v1/tasks/{name}", response_model=schemas.UnloadAnswer, summary="Stop serving a task")
    async def unload(name: str) -> schemas.UnloadAnswer:
        """Admin: stop serving the task between batches (its file stays; reload brings it back)."""
        snapshot = state.snapshot()
        try:
            await asyncio.to_thread(state.live.unload, name)
        except UnknownTask:
            raise ApiError(404, "unknown_task", unknown_task(name, snapshot)) from None
        except UsageError as exc:
            raise ApiError(409, "last_task", str(exc)) from None
        log.warning("unloaded task '%s' (API)", name)
        return schemas.UnloadAnswer(unloaded=name, version=state.live.current.version)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        if state.metrics is None:
            raise not_ready()
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
        served = served_task(state.snapshot(), task)
        return schemas.ModelMetadata(
            name=task, versions=[served.sha256[:12]], platform="vpt-cli",
            inputs=[schemas.TensorSpec(name="image", datatype="BYTES", shape=[-1])],
            outputs=[schemas.TensorSpec(name="label", datatype="BYTES", shape=[-1, -1]),
                     schemas.TensorSpec(name="score", datatype="FP32", shape=[-1, -1])])

    @app.get("/v2/models/{task}/ready", response_model=schemas.Ready, summary="Whether one task is served")
    async def model_ready(task: str) -> schemas.Ready:
        served_task(state.snapshot(), task)
        return schemas.Ready(ready=True)

    @app.post("/v2/models/{task}/infer", response_model=schemas.InferAnswer, summary="v2 inference")
    async def infer(task: str, body: schemas.InferRequest) -> schemas.InferAnswer:
        """One BYTES input of base64-encoded images; answers label and score tensors of shape [images, k].
        An image that cannot be decoded fails the request (the protocol has no per-image error)."""
        started = time.perf_counter()
        try:
            snapshot = state.snapshot()
            served = served_task(snapshot, task)
            images, top_k = read_infer(body, settings.max_images)
            answer = await answer_request(state, snapshot, images, [[task]] * len(images), top_k, started)
            bad = next((result for result in answer.results if result.error), None)
            if bad is not None:
                raise ApiError(422, "undecodable_image", f"image {bad.index}: {bad.error.message}")
        except ApiError as exc:
            loaded = state.live.current is not None and task in state.live.current.tasks
            count_request(state, "infer", [task] if loaded else [], exc.status)  # labels hold loaded names only
            raise
        count_request(state, "infer", [task], 200)
        k = min(top_k, len(served.info.classes))
        labels = [label.label for result in answer.results for label in result.answers[0].top]
        scores = [label.score for result in answer.results for label in result.answers[0].top]
        shape = [len(images), k]
        return schemas.InferAnswer(model_name=task, model_version=served.sha256[:12], id=body.id, outputs=[
            schemas.InferOutput(name="label", shape=shape, datatype="BYTES", data=labels),
            schemas.InferOutput(name="score", shape=shape, datatype="FP32", data=scores)])


