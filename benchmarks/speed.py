"""Train-step time, peak training memory and predict throughput of every method, in one process.

Same backbone, same batch, same engine code (`vpt_cli.training.engine.train_one_epoch` with the engine's
optimiser) for vpt-deep, vpt-shallow, linear and full fine-tuning; then the forward of a trained
task against the bare timm forward. Prints the ratios the project promises and rewrites the
`speed` section of docs/benchmarks.md, ending with a paragraph written from the numbers.

`--data-parallel` measures instead, side by side, one `vpt train` in 1 process against the same
command with `--devices cpu:2` (same global batch): the largest difference between the two
tasks' tensors and the time ratio, written to the `speed-ddp` section.

Peak memory on a CPU is the process's resident set sampled every half millisecond during the
steps, minus what was resident before the method's model and optimiser existed. glibc's malloc is
pinned to mmap large blocks (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the resident set and a
later method does not inherit an earlier one's high-water mark.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DEFAULT_WEIGHTS, PeakRSS, machine_line, markdown_table, pin_malloc, write_section  # noqa: E402

pin_malloc()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vpt_cli.artifact.schema import load_task  # noqa: E402
from vpt_cli.config import BackboneConfig, PromptConfig, TrainConfig  # noqa: E402
from vpt_cli.models.backbones import create_backbone  # noqa: E402
from vpt_cli.models.prompted import PromptedViT  # noqa: E402
from vpt_cli.runtime.context import RunContext  # noqa: E402
from vpt_cli.training.engine import build_optimizer, train_one_epoch, warmup_cosine  # noqa: E402

METHODS = ("vpt-deep", "vpt-shallow", "linear", "full")


class MethodRun:
    """One method's model, optimiser and schedule, built the way the engine builds them."""

    def __init__(self, model: PromptedViT):
        self.model = model
        self.optimizer = build_optimizer(model, TrainConfig())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(10**6, 0))
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)

    def seconds_per_step(self, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
        """The engine's own epoch loop over `steps` copies of one batch."""
        _, _, images_per_sec = train_one_epoch(self.model, [(images, labels, None)] * steps, self.optimizer,
                                               self.scheduler, self.scaler, RunContext(), "speed")
        return len(images) / images_per_sec


@torch.inference_mode()
def forward_seconds(forwards: list, images: torch.Tensor, repeats: int) -> list[float]:
    """Best-of-`repeats` seconds of one inference forward for each callable, after a warm-up.

    The callables take turns within every repeat, so load from other processes hits them alike.
    """
    best = [math.inf] * len(forwards)
    for forward in forwards:
        forward(images)
    for _ in range(repeats):
        for index, forward in enumerate(forwards):
            started = time.perf_counter()
            forward(images)
            best[index] = min(best[index], time.perf_counter() - started)
    return best


def reading(rows: dict[str, dict[str, float]], throughput_ratio: float, prompts: int) -> str:
    """What the tables show, written from the numbers so that it is regenerated with them."""
    deep, full, linear = rows["vpt-deep"], rows["full"], rows["linear"]
    cheaper = ": the CLS-only last block saves more than the prompts cost" if throughput_ratio >= 1 else ""
    return (
        f"What it shows: a vpt-deep step takes {deep['step'] / full['step']:.2f}x a full fine-tune's and "
        f"{deep['step'] / linear['step']:.1f}x a linear probe's (a forward and the head's gradient). Prompts at layer 0 "
        "need gradients through every block, so the input-gradient half of the backward runs as in a full "
        "fine-tune; what is saved is the weight gradients and their optimiser state. Peak training memory is "
        f"{deep['memory'] / full['memory']:.2f}x the full fine-tune's: no gradient or optimiser state exists for "
        "frozen weights and blocks compute only the rows something reads (vpt_cli/models/rows.py); what remains are "
        "the activations the input gradients need. vpt-deep trains "
        f"{int(deep['trainable']):,} parameters, {100 * deep['trainable'] / full['trainable']:.2f}% of the full "
        f"fine-tune's. A task with {prompts} prompts predicts at {throughput_ratio:.2f}x the bare backbone's "
        f"throughput{cheaper}.")


def timed_train(args: argparse.Namespace, home: Path, task: str, extra: list[str], threads: int) -> tuple[float, dict]:
    """Wall seconds of one `vpt train` command on sample_data and its --json result."""
    command = [sys.executable, "-m", "vpt_cli", "train", str(Path(__file__).resolve().parents[1] / "sample_data"),
               "--task", task, "--backbone", args.backbone, "--backbone-weights", args.weights,
               "--img-size", str(args.img_size), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
               "--prompts", str(args.prompts), "--prompt-dropout", "0", "--augment", "none", "--workers", "0",
               "--project", str(home / "runs"), "--json", "--quiet", *extra]
    env = {**os.environ, "VPT_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - started, json.loads(done.stdout)


def data_parallel(args: argparse.Namespace) -> None:
    """1 process against 2 gloo processes on the CPU, same global batch: max tensor difference and
    the time ratios (of the training epochs, and of the whole command with start-up). A 1-thread
    single process is the per-core baseline that isolates the machinery's cost."""
    cores = os.cpu_count() or 1
    runs = {  # name: (extra flags, torch threads per process, table label)
        "one": ([], cores, f"1 ({cores} torch threads)"),
        "one-thread": ([], 1, "1 (1 torch thread)"),
        "two": (["--devices", "cpu:2"], max(1, cores // 2), f"2, gloo ({max(1, cores // 2)} thread each)"),
    }
    best: dict[str, tuple[float, float]] = {name: (math.inf, math.inf) for name in runs}  # (epochs s, wall s)
    with tempfile.TemporaryDirectory() as tmp:
        home, results = Path(tmp), {}
        for _ in range(args.rounds):  # interleaved, best kept: load from other processes only adds
            for name, (extra, threads, _) in runs.items():
                wall, results[name] = timed_train(args, home, name, extra + ["--force"], threads)
                epochs = sum(h["seconds"] for h in results[name]["history"])
                best[name] = (min(best[name][0], epochs), min(best[name][1], wall))
        tensors = {name: load_task(Path(result["task_path"])).tensors for name, result in results.items()}
    difference = {name: max((tensors[name][k] - tensors["one"][k]).abs().max().item() for k in tensors["one"])
                  for name in runs}
    table = markdown_table(
        ["processes", "training epochs (s)", "whole command (s)", "max \\|task difference\\| vs the first row"],
        [[label, f"{best[name][0]:.1f}", f"{best[name][1]:.1f}", "-" if name == "one" else f"{difference[name]:.1e}"]
         for name, (_, _, label) in runs.items()])
    ratio, per_core = best["two"][0] / best["one"][0], best["one-thread"][0] / best["two"][0]
    text = (f"2 processes on the same {cores} cores take {ratio:.2f}x the 1-process training time "
            f"({best['two'][1] / best['one'][1]:.2f}x with start-up) and the tasks differ by at most "
            f"{difference['two']:.1e} (the float summation order of the gradient all-reduce). Against one "
            f"single-threaded process, 2 processes train {per_core:.2f}x as fast ({per_core / 2:.0%} of the ideal "
            "2x): what is missing is the machinery's cost (the all-reduce of every step, the gathered probe "
            "features, the metric sums) and the cores' sharing with other load.")
    print(table, text, sep="\n\n")
    if not args.no_docs:
        body = "\n\n".join([
            f"{machine_line()}; {args.backbone} at {args.img_size} px on sample_data (160 training images), "
            f"global batch {args.batch_size}, {args.epochs} epochs, {args.prompts} prompts, prompt dropout 0, no "
            f"augmentation; best of {args.rounds} interleaved rounds.", table, text])
        write_section("speed-ddp", "Data-parallel: 1 vs 2 processes", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="backbone safetensors file")
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="train steps per method and round")
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds, methods interleaved; the best is kept")
    parser.add_argument("--repeats", type=int, default=3, help="timed predict forwards (best is kept)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--decode-once", action="store_true",
                        help="instead: time `vpt train` on full-size JPEG photos against the same photos pre-shrunk")
    parser.add_argument("--photos", type=int, default=64, help="--decode-once: synthetic 3000 x 2000 JPEGs")
    parser.add_argument("--data-parallel", action="store_true", help="only the 1 vs 2 CPU processes comparison")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of each run (--decode-once: 5, --data-parallel: 2)")
    args = parser.parse_args()
    if args.decode_once:
        args.epochs = args.epochs or 5
        decode_once(args)
    elif args.data_parallel:
        args.epochs = args.epochs or 2
        data_parallel(args)
        return
    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig(name=args.backbone, weights=args.weights, img_size=args.img_size))
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    rows: dict[str, dict[str, float]] = {}
    runs: dict[str, MethodRun] = {}
    for method in METHODS:  # memory: each method's first step, measured alone
        # Full fine-tuning changes its backbone: give it a copy so the frozen one stays frozen.
        net = copy.deepcopy(backbone.model) if method == "full" else backbone.model
        with PeakRSS() as memory:
            runs[method] = MethodRun(PromptedViT(net, 10, PromptConfig(method=method, num_prompts=args.prompts)))
            runs[method].seconds_per_step(images, labels, 1)
        trainable = sum(p.numel() for p in runs[method].model.parameters() if p.requires_grad)
        rows[method] = {"step": float("inf"), "memory": memory.extra, "trainable": trainable}
    for _ in range(args.rounds):  # time: methods interleaved, best round kept (other load only adds)
        for method, run in runs.items():
            rows[method]["step"] = min(rows[method]["step"], run.seconds_per_step(images, labels, args.steps))
    for method, row in rows.items():
        print(f"{method:12s} step {row['step']:.3f}s  peak +{row['memory'] / 2**20:.0f} MiB  "
              f"{int(row['trainable']):,} trainable", flush=True)
    del runs
    task = PromptedViT(backbone.model, 10, PromptConfig(method="vpt-deep", num_prompts=args.prompts)).eval()
    bare, prompted = forward_seconds([backbone.model, task], images, args.repeats)
    patches = backbone.model.patch_embed.num_patches
    prefix = backbone.model.num_prefix_tokens
    limit = (prefix + patches) / (prefix + patches + args.prompts)
    throughput_ratio = bare / prompted
    full = rows["full"]
    checks = [
        ("vpt-deep train step / full", rows["vpt-deep"]["step"] / full["step"], "<= 0.75",
         rows["vpt-deep"]["step"] / full["step"] <= 0.75),
        ("vpt-deep peak train memory / full", rows["vpt-deep"]["memory"] / full["memory"], "<= 0.60",
         rows["vpt-deep"]["memory"] / full["memory"] <= 0.60),
        ("vpt-deep predict throughput / bare timm", throughput_ratio,
         f">= 0.95 x {limit:.3f} = {0.95 * limit:.3f}", throughput_ratio >= 0.95 * limit),
    ]
    method_table = markdown_table(
        ["method", "train step (s)", "img/s", "peak train memory (MiB)", "vs full", "trainable params"],
        [[m, f"{r['step']:.3f}", f"{args.batch_size / r['step']:.1f}", f"{r['memory'] / 2**20:.0f}",
          f"{r['memory'] / full['memory']:.2f}", f"{int(r['trainable']):,}"] for m, r in rows.items()])
    predict_table = markdown_table(
        ["forward (batch %d)" % args.batch_size, "seconds", "img/s"],
        [["bare timm backbone", f"{bare:.3f}", f"{args.batch_size / bare:.1f}"],
         [f"vpt-deep task ({args.prompts} prompts)", f"{prompted:.3f}", f"{args.batch_size / prompted:.1f}"]])
    check_table = markdown_table(["ratio", "measured", "target", "met"],
                                 [[name, f"{value:.3f}", target, "yes" if ok else "**no**"]
                                  for name, value, target, ok in checks])
    print(method_table, predict_table, check_table, reading(rows, throughput_ratio, args.prompts), sep="\n\n")
    if not args.no_docs:
        body = "\n\n".join([
            f"{machine_line()}; {args.backbone} at {args.img_size} px ({patches} patches), batch {args.batch_size}, "
            f"{args.prompts} prompts, random inputs; step time = best of {args.rounds} interleaved rounds of "
            f"{args.steps} steps after one warm-up step (which gives the memory peak).",
            method_table, predict_table, check_table, reading(rows, throughput_ratio, args.prompts),
        ])
        write_section("speed", "Speed and memory", body)


def write_photos(root: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """`count` textured JPEG photos of `size` in two class folders (a warm and a cool tint)."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        label = index % 2
        texture = rng.integers(0, 256, (size[1] // 20, size[0] // 20, 3), dtype=np.uint8)
        texture[..., 2 * label] = 230
        folder = root / ("warm", "cool")[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture).resize(size, Image.BICUBIC).save(folder / f"{index:03d}.jpg", quality=90)
        paths.append(folder / f"{index:03d}.jpg")
    return paths


def decode_once(args: argparse.Namespace) -> None:
    """`vpt train` (library API, 5 epochs) on full-size photos against the same photos pre-shrunk to
    the size training decodes them to; runs interleaved, best of two each."""
    from vpt_cli import api
    from vpt_cli.config import load_config
    from vpt_cli.data import decode_size, load_image

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = write_photos(work / "full", args.photos, (3000, 2000))
        backbone = create_backbone(BackboneConfig(name=args.backbone, weights=args.weights, img_size=args.img_size))
        size = decode_size(backbone.data_config)
        for photo in photos:  # the same photos, shrunk to what training decodes them to
            small = work / "small" / photo.relative_to(work / "full")
            small.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(photo) as image:
                image.resize((round(size * 1.5), size), Image.BICUBIC).save(small, quality=90)
        seconds = {"full": math.inf, "small": math.inf}
        for round_index in range(2):
            for name in seconds:
                config = load_config(None, {"data.path": str(work / name), "backbone.name": args.backbone,
                                            "backbone.weights": args.weights, "backbone.img_size": args.img_size,
                                            "train.epochs": args.epochs})
                started = time.perf_counter()
                api.train(config, task=str(work / f"{name}-{round_index}.safetensors"))
                seconds[name] = min(seconds[name], time.perf_counter() - started)
        started = time.perf_counter()
        load_image(photos[0])
        whole = time.perf_counter() - started
        started = time.perf_counter()
        load_image(photos[0], target=size)
        drafted = time.perf_counter() - started
    ratio = seconds["full"] / seconds["small"]
    table = markdown_table(
        ["photos", "run (s, best of 2)", "vs pre-shrunk"],
        [[f"{args.photos} JPEGs, 3000 x 2000", f"{seconds['full']:.1f}", f"{ratio:.2f} (target <= 1.2: "
          f"{'met' if ratio <= 1.2 else '**not met**'})"],
         [f"the same, pre-shrunk to {round(size * 1.5)} x {size}", f"{seconds['small']:.1f}", "1.00"]])
    note = (f"One full decode of a 3000 x 2000 photo takes {1e3 * whole:.0f} ms, a draft decode for {size} px "
            f"{1e3 * drafted:.0f} ms; without the cache every epoch of {args.epochs} (and the probe pass) would "
            f"pay the full decode for every photo.")
    print(table, note, sep="\n\n")
    if not args.no_docs:
        body = "\n\n".join([
            f"{machine_line()}; default `vpt train` ({args.epochs} epochs, {args.backbone} at {args.img_size} px) on "
            f"{args.photos} synthetic textured JPEG photos in two classes, full size and pre-shrunk, runs interleaved.",
            table, note])
        write_section("decode", "Photos decoded once", body)


if __name__ == "__main__":
    main()
