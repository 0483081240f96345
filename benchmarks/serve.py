"""One backbone serving K tasks: memory, mixed-batch throughput, and one process vs K processes.

Answering K tasks for one image still costs K sample-forwards (prompts change every layer), so
this measures what mixing can save, for K = 1, 2, 4, 8:

(a) resident memory of one process serving K tasks (peak RSS of a fresh process that loads them
    and answers one mixed window), against K=1 and against K full-model copies (what K fully
    fine-tuned tasks need: the backbone K times);
(b) throughput on a stream of requests whose tasks are drawn at random, handled in arrival
    windows of B images: one mixed forward per window vs the same window split into per-task
    sub-batches, each through its own task's PromptedViT (the mixed outputs are also checked
    against the split ones);
(c) wall time of one `vpt predict --task t1 ... --task tK` against K separate `vpt predict`
    processes over the same images, start-up included.

Tasks are random-prompt task files made through the library (the paper's uniform prompt init,
random heads, 10 VPT-deep prompts unless --prompts): their answers are meaningless, their cost is
exactly that of trained tasks. Rewrites only the `serve` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _report import DEFAULT_WEIGHTS, MMAP_ENV, ROOT, machine_line, markdown_table, write_section  # noqa: E402

from vpt_cli.artifact.home import resolve_task_path, tasks_dir  # noqa: E402
from vpt_cli.artifact.schema import Task, TaskInfo, load_task, save_task  # noqa: E402
from vpt_cli.config import BackboneConfig, PromptConfig  # noqa: E402
from vpt_cli.models.backbones import Backbone, create_backbone  # noqa: E402
from vpt_cli.models.prompted import PromptedViT  # noqa: E402
from vpt_cli.serving.loading import task_model  # noqa: E402
from vpt_cli.serving.tasks import load_tasks  # noqa: E402

BACKBONE = "vit_small_patch14_dinov2"
SAMPLE_IMAGES = ROOT / "sample_data" / "val"


def make_tasks(backbone: Backbone, count: int, prompts: int) -> list[str]:
    """`count` random-prompt VPT-deep task files in the registry ($VPT_HOME), 4 to 11 classes each."""
    names = []
    for t in range(count):
        torch.manual_seed(t)
        model = PromptedViT(backbone.model, 4 + t, PromptConfig("vpt-deep", prompts))
        info = TaskInfo(name=f"task{t}", backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
                        img_size=backbone.img_size, data_config=json.loads(json.dumps(backbone.data_config, default=list)),
                        prompt=asdict(PromptConfig("vpt-deep", prompts)), classes=[f"c{c}" for c in range(4 + t)],
                        backbone_weights=backbone.weights)
        save_task(Task(info, model.task_state_dict()), tasks_dir() / f"task{t}.safetensors", force=True)
        names.append(info.name)
    return names


def resident() -> dict[str, int]:
    """This process's resident set now (VmRSS) and its high-water mark (VmHWM), in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak": int(fields["VmHWM"].split()[0]) * 1024}


def child_memory(kind: str, k: int, weights: str, img_size: int, window: int) -> None:
    """Runs in a fresh process: load K tasks (or K full copies), answer one window, print its memory."""
    images = torch.randn(window, 3, img_size, img_size)
    task_index = torch.arange(window) % k
    with torch.inference_mode():
        if kind == "shared":
            server = load_tasks([f"task{t}" for t in range(k)])
            server.model(images, task_index)
        else:
            copies = [PromptedViT(create_backbone(BackboneConfig(name=BACKBONE, weights=weights, img_size=img_size)).model,
                                  4 + t, PromptConfig("full")).eval() for t in range(k)]
            for t, model in enumerate(copies):
                model(images[task_index == t])
    print(json.dumps(resident()))


def measure_memory(kind: str, k: int, args: argparse.Namespace) -> dict[str, int]:
    """Memory of a fresh process; glibc mmaps big blocks so freed load-time buffers leave its RSS."""
    command = [sys.executable, __file__, "--child", kind, "--child-k", str(k), "--weights", args.weights,
               "--img-size", str(args.img_size), "--window", str(args.window)]
    done = subprocess.run(command, capture_output=True, text=True, check=True,
                          env={**os.environ, MMAP_ENV: "65536"})
    return json.loads(done.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def stream_throughput(k: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """(mixed img/s, split img/s, max |mixed - split| logit) over one random-task request stream."""
    names = [f"task{t}" for t in range(k)]
    server = load_tasks(names)
    singles = [task_model(server.backbone.model, load_task(resolve_task_path(name))) for name in names]
    generator = torch.Generator().manual_seed(k)
    images = torch.randn(args.stream, 3, args.img_size, args.img_size, generator=generator)
    tasks = torch.randint(0, k, (args.stream,), generator=generator)
    windows = [(images[i : i + args.window], tasks[i : i + args.window]) for i in range(0, args.stream, args.window)]

    def mixed(batch: torch.Tensor, index: torch.Tensor) -> list[torch.Tensor]:
        logits = server.model(batch, index)
        return [logits[row, : singles[t].head.out_features] for row, t in enumerate(index.tolist())]

    def split(batch: torch.Tensor, index: torch.Tensor) -> list[torch.Tensor]:
        answers: list[torch.Tensor] = [torch.empty(0)] * len(index)
        for t in index.unique().tolist():
            rows = (index == t).nonzero().flatten()
            for row, logits in zip(rows.tolist(), singles[t](batch[rows])):
                answers[row] = logits
        return answers

    runs = {"mixed": mixed, "split": split}
    for run in runs.values():
        run(*windows[0])  # warm-up
    # Each window runs both ways back to back, in alternating order, and keeps its best of
    # `passes` times per way: load from other processes then hits both ways alike.
    best = {name: [float("inf")] * len(windows) for name in runs}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in runs}
    for attempt in range(args.passes):
        for w, window in enumerate(windows):
            for name in sorted(runs, reverse=(attempt + w) % 2 == 1):
                started = time.perf_counter()
                answers = runs[name](*window)
                best[name][w] = min(best[name][w], time.perf_counter() - started)
                if attempt == 0:
                    outputs[name] += answers
    diff = max((a - b).abs().max().item() for a, b in zip(outputs["mixed"], outputs["split"]))
    return args.stream / sum(best["mixed"]), args.stream / sum(best["split"]), diff


def process_seconds(k: int, folder: Path) -> tuple[float, float]:
    """(one `vpt predict` with K tasks, K separate `vpt predict` runs) wall seconds, start-up included."""
    def run(*tasks: str) -> float:
        flags = [flag for task in tasks for flag in ("--task", task)]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vpt_cli", "predict", str(folder), *flags, "--format", "json", "-q"],
                       check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    names = [f"task{t}" for t in range(k)]
    return run(*names), sum(run(name) for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="backbone safetensors file")
    parser.add_argument("--img-size", type=int, default=56)
    parser.add_argument("--ks", default="1,2,4,8", help="task counts to measure")
    parser.add_argument("--prompts", type=int, default=10, help="VPT-deep prompts per task")
    parser.add_argument("--window", type=int, default=32, help="images per arrival window (B)")
    parser.add_argument("--stream", type=int, default=256, help="requests in the random-task stream")
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the stream (best per window)")
    parser.add_argument("--images", type=int, default=32, help="images per `vpt predict` run in (c)")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--child", choices=("shared", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--child-k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_memory(args.child, args.child_k, args.weights, args.img_size, args.window)
        return
    ks = [int(k) for k in args.ks.split(",")]
    home = Path(tempfile.mkdtemp(prefix="vpt-serve-"))
    os.environ["VPT_HOME"] = str(home)  # children inherit it
    load_before = os.getloadavg()[0]
    try:
        started = time.perf_counter()
        backbone = create_backbone(BackboneConfig(name=BACKBONE, weights=args.weights, img_size=args.img_size))
        make_tasks(backbone, max(ks), args.prompts)
        del backbone
        folder = home / "images"
        folder.mkdir()
        for i, image in enumerate(sorted(SAMPLE_IMAGES.rglob("*.png"))[: args.images]):
            shutil.copy(image, folder / f"{i:03d}.png")
        rows = []
        for k in ks:
            shared, full = measure_memory("shared", k, args), measure_memory("full", k, args)
            mixed, split, diff = stream_throughput(k, args)
            one, separate = process_seconds(k, folder)
            rows.append((k, shared, full, mixed, split, diff, one, separate))
            print(f"K={k}: rss {shared['rss'] / 2**20:.0f} MiB (full copies {full['rss'] / 2**20:.0f} MiB), mixed {mixed:.1f} "
                  f"vs split {split:.1f} img/s (max diff {diff:.1e}), one process {one:.1f}s vs {k} processes "
                  f"{separate:.1f}s", file=sys.stderr)
        total = time.perf_counter() - started
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report(rows, args, total, (load_before, os.getloadavg()[0]))


def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def report(rows: list[tuple], args: argparse.Namespace, total: float, load: tuple[float, float]) -> None:
    base = rows[0][1] if rows[0][0] == 1 else None
    table = markdown_table(
        ["K tasks", "RSS serving K (peak)", "vs K=1", "K full copies (peak)", "shared / full", "mixed img/s",
         "split img/s", "mixed / split", "max \\|mixed - split\\|", "1 process, K tasks", "K processes", "speed-up"],
        [[str(k), f"{mib(shared['rss'])} ({mib(shared['peak'])})",
          f"{shared['rss'] / base['rss']:.3f}x" if base else "-", f"{mib(full['rss'])} ({mib(full['peak'])})",
          f"{shared['rss'] / full['rss']:.2f}", f"{mixed:.1f}", f"{split:.1f}", f"{mixed / split:.2f}", f"{diff:.1e}",
          f"{one:.1f} s", f"{separate:.1f} s", f"{separate / one:.2f}x"]
         for k, shared, full, mixed, split, diff, one, separate in rows])
    body = "\n\n".join([
        f"`{BACKBONE}` ({Path(args.weights).name}) at {args.img_size} px, tasks with {args.prompts} VPT-deep prompts "
        "(random-prompt task files made through the library: same cost as trained ones). "
        f"Throughput: a stream of {args.stream} requests with uniformly random tasks, in arrival windows of "
        f"{args.window} images; *mixed* runs each window as one batch, *split* runs each task's part of the "
        "window through that task's own model; best of two interleaved passes, decoding excluded. "
        f"Processes: {args.images} PNGs through `vpt predict`, start-up and model loading included. "
        "Memory: resident set of a fresh process after loading the tasks and answering one mixed window "
        "(glibc mmap threshold 64 KiB, so freed load-time buffers leave it), its peak in brackets; "
        "*K full copies* loads the backbone K times, which is what K fully fine-tuned tasks need.",
        table,
        "Where the gain is: memory (one backbone for K tasks, a few KB of prompts each) and batching "
        "(a mixed window keeps the batch full; split windows run K small batches). Answering K tasks for "
        "one image still costs K sample-forwards.",
        "K=1 compares identical work both ways, so its mixed/split and process ratios show the noise "
        f"of the run. {machine_line()} Whole run: {total:.0f} s; 1-minute load average {load[0]:.1f} at "
        f"the start, {load[1]:.1f} at the end (above the core count means other jobs shared the cores).",
    ])
    print(table)
    if not args.no_doc:
        write_section("serve", "Serving many tasks from one backbone (benchmarks/serve.py)", body)


if __name__ == "__main__":
    main()
