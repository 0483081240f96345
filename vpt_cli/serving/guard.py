"""What every request passes before any route runs: the API key, the body size cap, the access log.

A plain ASGI middleware, because the body cap must hold while the body streams in: a declared
Content-Length over the cap is refused before anything is read, and a body that grows past it
(chunked, or lying about its length) is cut off at the first byte too many.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("vpt.serve")

# Routes that answer without the key: probes must work before anyone holds one, and the page is
# static (it asks for the key itself and sends it on every API call).
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/"})


class BodyTooLarge(Exception):
    """The request body passed the cap while it was being read."""


async def send_error(send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app: Callable, *, api_key: str | None, max_body_bytes: int, access_log: bool) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = {"status": 0, "read": 0}

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        try:
            if not self._authorized(scope):
                await send_error(tracked_send, 401, "unauthorized", "this server needs 'Authorization: Bearer <key>'",
                                 {"WWW-Authenticate": "Bearer"})
            elif self._declared_length(scope) > self.max_body_bytes:
                await send_error(tracked_send, 413, "payload_too_large", self._too_large())
            else:
                await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if state["status"]:
                raise
            await send_error(tracked_send, 413, "payload_too_large", self._too_large())
        finally:
            if self.access_log:
                client = scope.get("client") or ("-", 0)
                log.info('%s "%s %s" %s %.1fms %dB', client[0], scope["method"], scope["path"], state["status"] or "-",
                         (time.perf_counter() - started) * 1000, state["read"])

    def _too_large(self) -> str:
        return f"the request body is over {self.max_body_bytes / 1e6:g} MB (--max-body-mb)"

    def _authorized(self, scope: Scope) -> bool:
        if self.key is None or scope["path"] in OPEN_PATHS:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key)

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        value = dict(scope.get("headers") or []).get(b"content-length", b"0")
        try:
            return int(value)
        except ValueError:
            return 0
