"""Reading an HTTP request into images and task names, bounded before any work.

Counts and names are checked before decoding, images come only from the request body (never a
URL or a server path), and every refusal is an `ApiError` that the app turns into
`{"error": {"code", "message"}}`.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Optional

from fastapi import Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vpt_cli.serving import schemas
from vpt_cli.serving.registry import ServedTask, Snapshot

MAX_TOP_K = 100


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def first_problem(errors: Any) -> str:
    """One line from pydantic's error list: where and what, without echoing the input."""
    errors = list(errors)
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON"
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid"))


MULTIPART_SCHEMA = {
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


async def read_predict(request: Request, max_images: int) -> tuple[list[tuple[Optional[str], bytes]], list[str], int]:
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
            raise ApiError(400, "bad_request", first_problem(exc.errors())) from None
        images = [(None, _b64(text, index)) for index, text in enumerate(body.images)]
        tasks, top_k = body.tasks, body.top_k
    else:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")
    if not images:
        raise ApiError(400, "no_images", "the request holds no image")
    return images, tasks, top_k


def read_infer(body: schemas.InferRequest, max_images: int) -> tuple[list[tuple[Optional[str], bytes]], int]:
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


def tasks_per_image(snapshot: Snapshot, fields: list[str], count: int) -> list[list[str]]:
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
            served_task(snapshot, name)
    return rows * count if len(rows) == 1 else rows


def served_task(snapshot: Snapshot, name: str) -> ServedTask:
    if name not in snapshot.tasks:
        raise ApiError(404, "unknown_task", unknown_task(name, snapshot))
    return snapshot.tasks[name]


def unknown_task(name: str, snapshot: Snapshot) -> str:
    shown = name if len(name) <= 64 and name.isprintable() else name[:64].encode("unicode_escape").decode() + "..."
    return f"task '{shown}' is not loaded (loaded: {', '.join(snapshot.tasks)})"
