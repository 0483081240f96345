"""The page at / in a real headless Chromium against real uvicorn: pick images, choose tasks, see bars.

Chromium is driven over its DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
ended by NUL on file descriptors 3 and 4), so no driver package is needed. With
VPT_SCREENSHOT=path the test also saves the page it drove (docs/serve-page.png comes from it).
"""
from __future__ import annotations

import base64
import io
import json
import os
import queue
import shutil
import subprocess
import threading
import time

import pytest
from conftest import SERVE_IMAGES, SERVE_TASKS
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (apt-get install chromium)")]


class DevTools:
    """A minimal DevTools client over Chromium's pipe: send a command, wait (bounded) for its answer."""

    def __init__(self, user_dir: str) -> None:
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()

        def wire() -> None:  # in the child: the pipe ends on the fds Chromium expects
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--remote-debugging-pipe", "--no-first-run", f"--user-data-dir={user_dir}", "about:blank"]
        self.process = subprocess.Popen([CHROMIUM, *flags], pass_fds=(3, 4), preexec_fn=wire,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._next = 0
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        buffer = b""
        while chunk := os.read(self._read, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))

    def send(self, method: str, session: str | None = None, timeout: float = 20, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply.get("id") == self._next:
                assert "error" not in reply, reply["error"]
                return reply.get("result", {})
            self.events.append(reply)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        os.close(self._write)


@pytest.fixture
def live_server(served):
    """Real uvicorn in a thread on a free loopback port, always stopped."""
    import uvicorn

    from vpt_cli.serving.http import create_app
    from vpt_cli.serving.runner import bind
    from vpt_cli.serving.settings import ServeSettings

    settings = ServeSettings(tasks=[str(served["folder"] / f"{name}.safetensors") for name in SERVE_TASKS],
                             device="cpu", workers=2)
    app = create_app(settings)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(1000):
        if app.state.serve.ready:
            break
        time.sleep(0.01)
    assert app.state.serve.ready
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def evaluate(tools: DevTools, session: str, expression: str):
    result = tools.send("Runtime.evaluate", session, expression=expression, returnByValue=True)
    return result["result"].get("value")


def wait_for(tools: DevTools, session: str, expression: str, what: str):
    for _ in range(400):
        value = evaluate(tools, session, expression)
        if value:
            return value
        time.sleep(0.025)
    raise AssertionError(f"the page never {what}")


def test_page_picks_images_and_shows_top_k_bars_per_task(live_server, served, tmp_path):
    tools = DevTools(str(tmp_path / "chromium"))
    try:
        target = tools.send("Target.createTarget", url="about:blank")["targetId"]
        session = tools.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime", "DOM"):
            tools.send(f"{domain}.enable", session)
        tools.send("Emulation.setDeviceMetricsOverride", session, width=1200, height=860, deviceScaleFactor=1,
                   mobile=False)
        tools.send("Page.navigate", session, url=live_server + "/")
        wait_for(tools, session, "document.querySelectorAll('#tasks input').length === 3", "listed the three tasks")
        assert evaluate(tools, session, "document.getElementById('status').textContent") == "ready"
        evaluate(tools, session, "document.querySelectorAll('#tasks input')[2].click()")  # deep3 is on; add proj2
        root = tools.send("DOM.getDocument", session)["root"]["nodeId"]
        picker = tools.send("DOM.querySelector", session, nodeId=root, selector="#files")["nodeId"]
        images = [SERVE_IMAGES[0], SERVE_IMAGES[2]]
        tools.send("DOM.setFileInputFiles", session, nodeId=picker, files=[str(path) for path in images])
        wait_for(tools, session, "!document.getElementById('send').disabled", "enabled Predict")
        evaluate(tools, session, "document.getElementById('send').click()")
        wait_for(tools, session, "document.querySelectorAll('.bar').length === 2 * (2 + 3)", "drew the bars")
        shown = evaluate(tools, session, "[...document.querySelectorAll('.card')].map(card => [...card.querySelectorAll("
                                         "'.task-answer')].map(a => [a.querySelector('b').textContent, "
                                         "a.querySelector('.name').textContent]))")
        expected = [[[task, served["expected"][(path.name, task)][0][0]] for task in ("deep3", "proj2")]
                    for path in images]
        assert shown == expected
        shot = base64.b64decode(tools.send("Page.captureScreenshot", session, format="png")["data"])
        with Image.open(io.BytesIO(shot)) as image:
            assert image.size == (1200, 860)
            assert len(image.convert("RGB").getcolors(1 << 20) or range(1000)) > 50  # bars, text and images
        if os.environ.get("VPT_SCREENSHOT"):
            with open(os.environ["VPT_SCREENSHOT"], "wb") as handle:
                handle.write(shot)
        requested = [event["params"]["request"]["url"] for event in tools.events
                     if event.get("method") == "Network.requestWillBeSent"]
        assert requested and all(url.startswith((live_server, "blob:", "data:")) for url in requested), requested
    finally:
        tools.close()
