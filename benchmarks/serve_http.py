"""`vpt serve` over real HTTP: cross-task batching against per-task, none, and offline predict.

Each batching mode runs as a real `vpt serve` process (uvicorn on a free loopback port, all
tasks loaded); this process is the client (httpx.AsyncClient, one image per request, images
spread uniformly over the first K tasks). Every loop is bounded in count and time.

* closed loop: N concurrent clients, each sending its next request when the last is answered:
  saturated throughput, latency percentiles, mean batch size (from the server's /metrics);
* open loop: requests at a fixed rate; latency counts from each request's scheduled send time,
  so queueing is never hidden by a client that waits (coordinated omission);
* offline: the same images decoded and answered by a TaskServer in this process, batches of
  max-batch (what `vpt predict` does, without HTTP): the ceiling;
* bare backbone forward at batch 1 and at max-batch: the batching gain this machine offers.

Tasks are random-prompt task files (benchmarks/serve.py's make_tasks): same cost as trained ones.
Rewrites only the `serve-http` section of docs/benchmarks.md and docs/serve-latency.png.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
import torch  # noqa: E402
from _report import DEFAULT_WEIGHTS, ROOT, machine_line, markdown_table, write_section  # noqa: E402
from PIL import Image  # noqa: E402
from serve import BACKBONE, SAMPLE_IMAGES, make_tasks  # noqa: E402

from vpt_cli.config import BackboneConfig  # noqa: E402
from vpt_cli.data.images import decode_image_bytes  # noqa: E402
from vpt_cli.evaluation.plots import render_line_chart_png  # noqa: E402
from vpt_cli.models.backbones import create_backbone  # noqa: E402
from vpt_cli.serving.tasks import load_tasks  # noqa: E402

PLOT = ROOT / "docs" / "serve-latency.png"
START_TIMEOUT_S = 120


@dataclass
class Run:
    mode: str
    k: int
    load: str  # "closed N" or "open R/s"
    offered: float  # open loop: requests per second; closed loop: 0
    images_per_s: float
    p50: float
    p95: float
    p99: float
    errors: int
    answered: int
    mean_batch: float


def encoded_images(count: int, side: int) -> list[bytes]:
    """The sample PNGs as `side`-pixel JPEGs: a realistic decode cost per request."""
    files = sorted(SAMPLE_IMAGES.rglob("*.png"))[:count]
    images = []
    for path in files:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Server:
    """One `vpt serve` process for one batching mode; stopped with SIGTERM (killed if it hangs)."""

    def __init__(self, mode: str, tasks: list[str], args: argparse.Namespace, home: Path) -> None:
        flags = [flag for task in tasks for flag in ("--task", task)]
        command = [sys.executable, "-m", "vpt_cli", "serve", *flags, "--port", "0", "--device", args.device,
                   "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--batching", mode,
                   "--workers", str(args.workers), "--max-queue", "100000", "--timeout-s", "120",
                   "--backbone-weights", args.weights]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                        env={**os.environ, "VPT_HOME": str(home), "VPT_API_KEY": ""})
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stderr] + [lines.put(None)],
                         daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        seen = []
        while time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError("vpt serve exited before it was ready:\n" + "".join(seen))
            seen.append(line)
            found = re.search(r"ready on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                return
        self.stop()
        raise RuntimeError("vpt serve was not ready in time:\n" + "".join(seen))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


async def batch_stats(client: httpx.AsyncClient) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = (await client.get("/metrics")).text
    total = float(re.search(r"^vpt_batch_size_sum ([\d.e+]+)$", text, re.M).group(1))
    count = float(re.search(r"^vpt_batch_size_count ([\d.e+]+)$", text, re.M).group(1))
    return total, count


async def one_request(client: httpx.AsyncClient, image: bytes, task: str) -> bool:
    try:
        response = await client.post("/v1/predict", files=[("image", ("i.jpg", image, "image/jpeg"))],
                                     data={"task": task, "top_k": "3"})
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def closed_loop(url: str, mode: str, k: int, clients: int, images: list[bytes], seconds: float,
                      max_requests: int) -> Run:
    """`clients` concurrent senders for `seconds` (or `max_requests` in all), one image each."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        before = await batch_stats(client)
        latencies: list[float] = []
        errors = 0
        counter = iter(range(max_requests))
        started = time.perf_counter()
        deadline = started + seconds

        async def sender() -> None:
            nonlocal errors
            for number in counter:
                if time.perf_counter() >= deadline:
                    return
                sent = time.perf_counter()
                ok = await one_request(client, images[number % len(images)], f"task{number % k}")
                if ok:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1

        await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(clients))), seconds + 120)
        elapsed = time.perf_counter() - started
        after = await batch_stats(client)
    return Run(mode, k, f"closed, {clients} client{'s' if clients > 1 else ''}", 0.0, len(latencies) / elapsed, *summary(latencies), errors,
               len(latencies), mean_batch(before, after))


async def open_loop(url: str, mode: str, k: int, rate: float, images: list[bytes], seconds: float) -> Run:
    """Requests at `rate` per second for `seconds`; latency from each request's scheduled time."""
    count = max(1, int(rate * seconds))
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        before = await batch_stats(client)
        latencies: list[float] = []
        errors = 0
        started = time.perf_counter()

        async def scheduled(number: int) -> None:
            nonlocal errors
            due = started + number / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            ok = await one_request(client, images[number % len(images)], f"task{number % k}")
            if ok:
                latencies.append(time.perf_counter() - due)
            else:
                errors += 1

        await asyncio.wait_for(asyncio.gather(*(scheduled(n) for n in range(count))), seconds + 120)
        elapsed = time.perf_counter() - started
        after = await batch_stats(client)
    return Run(mode, k, f"open, {rate:.1f} img/s", rate, len(latencies) / elapsed, *summary(latencies), errors,
               len(latencies), mean_batch(before, after))


def summary(latencies: list[float]) -> tuple[float, float, float]:
    return tuple(percentile(latencies, q) * 1000 for q in (0.5, 0.95, 0.99))


def mean_batch(before: tuple[float, float], after: tuple[float, float]) -> float:
    batches = after[1] - before[1]
    return (after[0] - before[0]) / batches if batches else float("nan")


@torch.inference_mode()
def offline(tasks: list[str], k: int, images: list[bytes], args: argparse.Namespace) -> float:
    """img/s of a TaskServer in this process: decode + transform + batched forwards, tasks spread over K."""
    server = load_tasks(tasks, backbone_weights=args.weights, device=args.device)
    server.predict(torch.zeros(2, 3, args.img_size, args.img_size), "task0")  # warm-up
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        for start in range(0, len(images), args.max_batch):
            chunk = images[start : start + args.max_batch]
            batch = torch.stack([server.transform(decode_image_bytes(data)) for data in chunk])
            names = [f"task{(start + i) % k}" for i in range(len(chunk))]
            server.predict(batch, names, top_k=3, amp=False)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


@torch.inference_mode()
def bare_forward(args: argparse.Namespace) -> tuple[float, float]:
    """(img/s at batch 1, img/s at max-batch) of the plain backbone forward, best of a few."""
    model = create_backbone(BackboneConfig(name=BACKBONE, weights=args.weights, img_size=args.img_size)).model.eval()

    def rate(batch: int) -> float:
        images = torch.randn(batch, 3, args.img_size, args.img_size)
        model(images)
        repeats = max(3, 2 * args.max_batch // batch)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            model(images)
            best = min(best, time.perf_counter() - started)
        return batch / best

    return rate(1), rate(args.max_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="backbone safetensors file")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--prompts", type=int, default=10, help="VPT-deep prompts per task")
    parser.add_argument("--ks", default="1,2,8", help="task counts the requests are spread over (must include 1)")
    parser.add_argument("--max-batch", type=int, default=16, help="the servers' --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the servers' --max-wait-ms")
    parser.add_argument("--workers", type=int, default=2, help="the servers' decode threads")
    parser.add_argument("--clients", type=int, default=0, help="closed-loop clients [default: 2 x max-batch]")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured run")
    parser.add_argument("--max-requests", type=int, default=5000, help="cap on requests per closed-loop run")
    parser.add_argument("--loads", default="0.25,0.5,0.75,0.9", help="open-loop rates, as fractions of saturation")
    parser.add_argument("--images", type=int, default=64, help="distinct images (sample PNGs as JPEGs)")
    parser.add_argument("--image-side", type=int, default=224, help="pixels per side of those JPEGs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the servers
    ks = [int(k) for k in args.ks.split(",")]
    if 1 not in ks:  # the spread goal compares K tasks with all images on one task
        parser.error("--ks must include 1")
    clients = args.clients or 2 * args.max_batch
    home = Path(tempfile.mkdtemp(prefix="vpt-serve-http-"))
    os.environ["VPT_HOME"] = str(home)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        backbone = create_backbone(BackboneConfig(name=BACKBONE, weights=args.weights, img_size=args.img_size))
        tasks = make_tasks(backbone, max(ks), args.prompts)
        del backbone
        images = encoded_images(args.images, args.image_side)
        bare = bare_forward(args)
        ceiling = {k: offline(tasks, k, images * 2, args) for k in (1, max(ks))}
        print(f"bare forward {bare[0]:.1f} -> {bare[1]:.1f} img/s; offline {ceiling}", file=sys.stderr)
        runs = asyncio.run(measure(tasks, ks, clients, images, args, home))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report(runs, bare, ceiling, ks, clients, args, time.perf_counter() - started, (load_before, os.getloadavg()[0]))


async def measure(tasks: list[str], ks: list[int], clients: int, images: list[bytes], args: argparse.Namespace,
                  home: Path) -> list[Run]:
    runs: list[Run] = []
    top = max(ks)

    def note(run: Run) -> Run:
        print(f"{run.mode:>10} K={run.k} {run.load:>20}: {run.images_per_s:6.1f} img/s, p50 {run.p50:6.1f} p99 "
              f"{run.p99:7.1f} ms, errors {run.errors}, mean batch {run.mean_batch:.1f}", file=sys.stderr)
        runs.append(run)
        return run

    for mode in ("cross-task", "per-task", "none"):
        server = await asyncio.to_thread(Server, mode, tasks, args, home)
        try:
            await closed_loop(server.url, mode, top, clients, images, 1.0, 500)  # warm-up, not reported
            if mode == "cross-task":
                note(await closed_loop(server.url, mode, top, 1, images, args.seconds, args.max_requests))
            saturated = {}
            for k in (ks if mode != "none" else [top]):
                saturated[k] = note(await closed_loop(server.url, mode, k, clients, images, args.seconds,
                                                      args.max_requests)).images_per_s
            fractions = [float(f) for f in args.loads.split(",")] if mode == "cross-task" else [0.5]
            if mode != "none":
                for fraction in fractions:
                    note(await open_loop(server.url, mode, top, fraction * saturated[top], images, args.seconds))
        finally:
            await asyncio.to_thread(server.stop)
    return runs


def report(runs: list[Run], bare: tuple[float, float], ceiling: dict[int, float], ks: list[int], clients: int,
           args: argparse.Namespace, total: float, load: tuple[float, float]) -> None:
    top = max(ks)

    def find(mode: str, k: int, load: str) -> Run:
        return next(r for r in runs if r.mode == mode and r.k == k and r.load.startswith(load))

    cross = find("cross-task", top, f"closed, {clients}")
    unloaded = find("cross-task", top, "closed, 1 client")
    half = min((r for r in runs if r.mode == "cross-task" and r.offered),
               key=lambda r: abs(r.offered - 0.5 * cross.images_per_s))
    bare_gain = bare[1] / bare[0]
    goals = [
        ("saturated cross-task throughput vs offline predict", cross.images_per_s / ceiling[top], 0.85),
        ("gain over no batching vs the bare forward's batching gain",
         (cross.images_per_s / find("none", top, "closed").images_per_s) / bare_gain, 0.8),
        (f"cross-task vs per-task batching at K={top}", cross.images_per_s / find("per-task", top, "closed").images_per_s,
         1.3),
        (f"K={top} spread vs all on one task", cross.images_per_s / find("cross-task", 1, f"closed, {clients}").images_per_s,
         0.95),
        ("p99 at 50% of saturated load vs unloaded single-request latency", half.p99 / unloaded.p50, None),
    ]
    goal_rows = [[what, f"{value:.2f}", (f">= {target}" if target is not None else "<= 3"),
                  "yes" if (value >= target if target is not None else value <= 3) else "**no**"]
                 for what, value, target in goals]
    for what, value, target in goals:
        print(f"goal: {what}: {value:.2f} ({'>= ' + str(target) if target else '<= 3'})", file=sys.stderr)
    table = markdown_table(
        ["mode", "K tasks", "load", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch"],
        [[r.mode, str(r.k), r.load, f"{r.images_per_s:.1f}", f"{r.p50:.1f}", f"{r.p95:.1f}", f"{r.p99:.1f}",
          str(r.errors), f"{r.mean_batch:.1f}"] for r in runs]
        + [["offline (TaskServer, no HTTP)", str(k), f"batches of {args.max_batch}", f"{ceiling[k]:.1f}", "-", "-", "-",
            "0", str(args.max_batch)] for k in sorted(ceiling)])
    goals_table = markdown_table(["goal (issue 22)", "measured", "target", "met here"], goal_rows)
    open_runs = {mode: sorted((r for r in runs if r.mode == mode and r.offered), key=lambda r: r.offered)
                 for mode in ("cross-task", "per-task")}
    series = [("cross-task p50", (31, 119, 180), [(r.offered, r.p50) for r in open_runs["cross-task"]]),
              ("cross-task p99", (230, 110, 0), [(r.offered, r.p99) for r in open_runs["cross-task"]]),
              ("per-task p99", (150, 150, 150), [(r.offered, r.p99) for r in open_runs["per-task"]])]
    print(table)
    print(goals_table)
    if args.no_doc:
        return
    render_line_chart_png(series, PLOT, f"latency ms, open loop, K={top}", "offered img/s")
    body = "\n\n".join([
        f"`vpt serve` processes (uvicorn on loopback) of `{BACKBONE}` ({Path(args.weights).name}) at {args.img_size} px, "
        f"{top} random-prompt tasks with {args.prompts} VPT-deep prompts loaded, `--max-batch {args.max_batch} "
        f"--max-wait-ms {args.max_wait_ms:g} --workers {args.workers}`, {args.device}; the client is this process "
        f"(httpx, one {args.image_side} px JPEG per multipart request, tasks spread uniformly over K). Closed loop: "
        f"{clients} concurrent clients for {args.seconds:g} s; open loop: a fixed request rate for {args.seconds:g} s, "
        "latency from each request's scheduled send time. *offline* decodes and answers the same images in one "
        "process with a TaskServer (what `vpt predict` does, without HTTP). Mean batch comes from the server's "
        "/metrics.",
        f"Bare backbone forward: {bare[0]:.1f} img/s at batch 1, {bare[1]:.1f} img/s at batch {args.max_batch}: "
        f"a batching gain of {bare_gain:.2f}x on this machine.",
        table,
        goals_table,
        "![latency against load](serve-latency.png)",
        "On 2 CPU cores the client, the decode threads and the forward share the same two cores, so the HTTP "
        "and decode cost per request competes with the model itself; the goals are ratios so that the same "
        "run on a bigger machine or a GPU can be compared. "
        + (f"Not met in this run: {'; '.join(row[0] for row in goal_rows if row[3] != 'yes')}. " if any(
            row[3] != "yes" for row in goal_rows) else "")
        + (f"Other jobs shared the cores during this run (load average {max(load):.1f} on {os.cpu_count()} cores): "
           "forward times were then several times the quiet-machine ones and the ratios carry that noise."
           if max(load) > (os.cpu_count() or 1) else ""),
        f"{machine_line()} Whole run: {total:.0f} s; 1-minute load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end (above the core count means other jobs shared the cores).",
    ])
    write_section("serve-http", "Serving over HTTP: cross-task dynamic batching (benchmarks/serve_http.py)", body)


if __name__ == "__main__":
    main()
