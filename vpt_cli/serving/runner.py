"""Running the app under uvicorn: the exposure check, the socket, the ready line, a graceful drain.

SIGTERM and SIGINT make uvicorn stop accepting, let the requests it accepted finish (their pairs
are still batched and answered) for up to the drain timeout, then close the batcher; the process
then exits 0. uvicorn raises the signal again once it is done, so a no-op handler is put in place
first: a drain that went to plan is not an error.
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable

from vpt_cli.core.errors import UsageError
from vpt_cli.serving.answering import ServeState
from vpt_cli.serving.http import create_app
from vpt_cli.serving.settings import ServeSettings


def check_exposure(host: str, api_key: str | None, insecure_no_key: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless explicitly told to."""
    if api_key or insecure_no_key or is_loopback(host):
        return
    raise UsageError(f"--host {host} is reachable from other machines: set --api-key (or VPT_API_KEY), or pass "
                     "--insecure-no-key if something in front of it checks callers")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), bound before the app starts so the port is known."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(settings: ServeSettings, *, insecure_no_key: bool = False,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; raises the start-up error (a bad task, bad weights) if loading failed."""
    import uvicorn

    check_exposure(settings.host, settings.api_key, insecure_no_key)
    settings.check()
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server: uvicorn.Server | None = None

    def ready(state: ServeState) -> None:
        snapshot = state.live.current
        line = (f"ready on http://{shown_host}:{port} ({len(snapshot.tasks)} tasks on {snapshot.server.backbone.name}, "
                f"{snapshot.server.device.type}; max batch {state.batcher.max_batch}, "
                f"max wait {settings.max_wait_ms:g} ms)")
        (on_ready or _print)(line)

    def failed(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    logging.getLogger("vpt.serve").setLevel(logging.INFO)
    if not logging.getLogger("vpt.serve").handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logging.getLogger("vpt.serve").addHandler(handler)
    app = create_app(settings, on_ready=ready, on_failure=failed)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)))
    server = uvicorn.Server(config)
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda *args: None) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    failure = app.state.serve.failure
    if failure is not None:
        raise failure


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
