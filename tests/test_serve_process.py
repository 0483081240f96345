"""The real thing: `vpt serve` as a process under uvicorn on a free loopback port, drained by SIGTERM."""
from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import SERVE_IMAGES, SERVE_TASKS


def read_lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@pytest.mark.heavy
def test_vpt_serve_on_a_free_port_answers_everything_accepted_then_exits_0_on_sigterm(served):
    tasks = [arg for name in list(SERVE_TASKS)[:2] for arg in ("--task", str(served["folder"] / f"{name}.safetensors"))]
    command = [sys.executable, "-m", "vpt_cli", "serve", *tasks, "--port", "0", "--device", "cpu", "--workers", "2",
               "--max-wait-ms", "400", "--max-batch", "64", "--access-log", "--drain-timeout", "5"]
    env = {key: value for key, value in os.environ.items() if key != "VPT_API_KEY"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stderr, lines), daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "vpt serve exited before it was ready:\n" + "".join(seen)
            seen.append(line)
            found = re.search(r"ready on http://127\.0\.0\.1:(\d+) \(2 tasks", line)
            port = int(found.group(1)) if found else None
        assert port, "no ready line:\n" + "".join(seen)

        async def traffic() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
                assert (await client.get("/v2/health/ready")).status_code == 200
                files = [("image", (path.name, path.read_bytes(), "image/png")) for path in SERVE_IMAGES[:2]]
                pending = [asyncio.create_task(client.post("/v1/predict", files=files, data={"task": "deep3,shallow5"}))
                           for _ in range(4)]
                for _ in range(200):  # until the 16 pairs wait in the queue (the batch waits 400 ms)
                    metrics = (await client.get("/metrics")).text
                    if re.search(r"^vpt_queue_depth 16\.0$", metrics, re.M):
                        break
                    await asyncio.sleep(0.005)
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*pending)

        responses = asyncio.run(traffic())
        assert [response.status_code for response in responses] == [200] * 4
        assert all(len(r.json()["results"]) == 2 for r in responses)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    log = "".join(seen)
    assert len(re.findall(r'127\.0\.0\.1 "POST /v1/predict" 200 ', log)) == 4, log
    assert "stopped" in log and "Traceback" not in log
