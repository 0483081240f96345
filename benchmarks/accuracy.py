"""Test accuracy of linear / vpt-shallow / vpt-deep / full on few-shot Fashion-MNIST, real weights.

Every run is a default `vpt train` (library API, only method, input size and seed changed) on a
folder of k training images per class written as PNGs, so it measures exactly what a user gets:
the same data pipeline, the 10% stratified val split, the default epoch selection. The task is
then loaded back from its file and scored on a fixed held-out sample of the official test set.
Each prompt method is compared with the linear probe seed by seed (same images, split and test
sample), so the verdict is a paired difference with its standard error. Rewrites the `accuracy`
section of docs/benchmarks.md (or `--section`): the table, the verdicts and a paragraph written
from the numbers.

Data: Debian's dataset-fashion-mnist (idx files in /usr/share/datasets/fashion-mnist).
Weights: ../shared/assets/dinov2_vits14.safetensors (a real pretrained DINOv2 ViT-S/14).
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DEFAULT_WEIGHTS, PeakRSS, machine_line, markdown_table, pin_malloc, write_section  # noqa: E402

pin_malloc()
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vpt_cli import api  # noqa: E402
from vpt_cli.config import load_config  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
METHODS = ("linear", "vpt-shallow", "vpt-deep", "full")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: big-endian magic, dims, then uint8 data) as an array."""
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    for index in indices:
        folder = root / CLASSES[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(folder / f"{index:05d}.png")


def per_class(labels: np.ndarray, k: int, rng: np.random.Generator | None) -> np.ndarray:
    """k indices of each class: random with `rng`, else the first k (the fixed test sample)."""
    picks = []
    for label in range(len(CLASSES)):
        pool = np.flatnonzero(labels == label)
        picks.append(rng.choice(pool, k, replace=False) if rng is not None else pool[:k])
    return np.concatenate(picks)


def number_or_text(value: str) -> int | float | str:
    """'1e-3' -> 0.001 (YAML would keep it a string), '15' -> 15, 'crop' -> 'crop'."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if len(values) < 2:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


Results = dict[tuple[int, int, str], list[dict[str, float]]]


def paired_gains(results: Results, k: int, size: int, method: str) -> list[float]:
    """Test top-1 points of `method` over the linear probe, seed by seed (same images, split, test)."""
    return [100 * (r["test"] - p["test"]) for r, p in zip(results[k, size, method], results[k, size, "linear"])]


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def compared(results: Results) -> list[tuple[int, int, str]]:
    """The (shots, size, method) keys that have a linear probe to be compared with."""
    return [(k, size, method) for k, size, method in results
            if method != "linear" and (k, size, "linear") in results]


def verdicts(results: Results) -> str:
    """One line per (shots, size, prompt method): its test accuracy against the linear probe's on the
    same seeds, as a paired mean difference."""
    lines = []
    for k, size, method in compared(results):
        gains = paired_gains(results, k, size, method)
        spread = f" ± {standard_error(gains):.1f} (standard error)" if len(gains) > 1 else ""
        lines.append(f"- {k} shots/class, {size} px: {method} vs linear probe {statistics.mean(gains):+.1f}{spread} "
                     f"points test top-1, ahead on {sum(g > 0 for g in gains)} of {len(gains)} seeds.")
    return "\n".join(lines)


def ratio_range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.0f}x" if round(low) == round(high) else f"{low:.0f}-{high:.0f}x"


def reading(results: Results) -> str:
    """What the table shows, written from the numbers so that it is regenerated with them."""
    sentences = []
    for method in ("vpt-deep", "vpt-shallow", "full"):
        keys = [key for key in compared(results) if key[2] == method]
        if not keys:
            continue
        gains = [paired_gains(results, k, size, method) for k, size, _ in keys]
        ahead = sum(statistics.mean(g) > 0 for g in gains)
        clear = sum(statistics.mean(g) > 2 * standard_error(g) for g in gains)
        slower = [statistics.mean(r["seconds"] for r in results[key]) /
                  statistics.mean(r["seconds"] for r in results[key[0], key[1], "linear"]) for key in keys]
        label = "Default `vpt train` (vpt-deep)" if method == "vpt-deep" else f"`--method {method}`"
        sentences.append(f"{label} is ahead of the linear probe on average in {ahead} of {len(keys)} settings, "
                         f"by more than two standard errors in {clear}, and trains {ratio_range(slower)} as long "
                         f"(the probe computes features once; {method} runs backward passes every epoch).")
    both = [(k, size) for k, size, method in results if method == "full" and (k, size, "vpt-deep") in results]
    if both:
        deep, full = (results[(*both[0], method)][0]["bytes"] for method in ("vpt-deep", "full"))
        sentences.append(f"At {both[0][1]} px a vpt-deep task file is {deep / 1e3:,.0f} KB against the full "
                         f"fine-tune's {full / 1e6:,.0f} MB.")
    if not sentences:
        return ""
    sentences.append("A difference within two standard errors of zero is not yet a result: more `--seeds` resolve it.")
    return "What it shows: " + " ".join(sentences)


def train_and_test(overrides: dict[str, object], task_path: Path, work: Path) -> dict[str, float]:
    """One default `vpt train` with `overrides`, then the saved task scored on the test folder."""
    started = time.perf_counter()
    with PeakRSS() as memory:
        trained = api.train(load_config(None, overrides), task=str(task_path))
    seconds = time.perf_counter() - started
    test = api.evaluate(work / "test", trained.task_path, output_dir=work / "eval").report
    return {"test": test.top1, "val": trained.val_report.top1 if trained.val_report else float("nan"),
            "seconds": seconds, "memory": memory.extra, "params": trained.trainable_params,
            "bytes": trained.task_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", default="10", help="training images per class, comma-separated (e.g. 10,50,100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (shots, size, method): sample, split and init")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--test-per-class", type=int, default=300, help="fixed held-out test images per class")
    parser.add_argument("--img-size", default="56", help="input sizes in pixels, comma-separated (e.g. 56,112)")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. train.lr=1e-2")
    parser.add_argument("--section", default="accuracy",
                        help="docs/benchmarks.md section to rewrite; give a larger run its own (e.g. accuracy-shots)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    extra = {key: number_or_text(value) for key, _, value in (item.partition("=") for item in args.set)}
    train_x, train_y = read_idx(FASHION / "train-images-idx3-ubyte.gz"), read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(FASHION / "t10k-images-idx3-ubyte.gz"), read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    shots = [int(s) for s in args.shots.split(",")]
    sizes = [int(s) for s in args.img_size.split(",")]
    methods = args.methods.split(",")
    results: Results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_folder(work / "test", test_x, test_y, per_class(test_y, args.test_per_class, None))
        for k, size, seed in itertools.product(shots, sizes, range(args.seeds)):
            data = work / f"k{k}_s{seed}"
            if not data.exists():
                write_folder(data, train_x, train_y, per_class(train_y, k, np.random.default_rng(seed)))
            for method in methods:
                overrides = {"data.path": str(data), "backbone.name": "vit_small_patch14_dinov2",
                             "backbone.weights": args.weights, "backbone.img_size": size,
                             "prompt.method": method, "train.seed": seed, **extra}
                row = train_and_test(overrides, work / f"{data.name}_{size}px_{method}.safetensors", work)
                results.setdefault((k, size, method), []).append(row)
                print(f"k={k} size={size} seed={seed} {method:11s} test {row['test']:.4f} val {row['val']:.3f} "
                      f"{row['seconds']:.0f}s +{row['memory'] / 2**20:.0f} MiB", flush=True)
    table = markdown_table(
        ["shots/class", "px", "method", "test top-1 % (mean ± std)", "train wall time (s)", "peak train memory (MiB)",
         "trainable params", "task file"],
        [[str(k), str(size), method, mean_std([r["test"] for r in rows], 100),
          mean_std([r["seconds"] for r in rows], digits=0), f"{max(r['memory'] for r in rows) / 2**20:.0f}",
          f"{int(rows[0]['params']):,}", f"{rows[0]['bytes'] / 1e3:,.0f} KB"]
         for (k, size, method), rows in results.items()])
    summary = "\n\n".join(part for part in (verdicts(results), reading(results)) if part)
    print(table, summary, sep="\n\n")
    if not args.no_docs:
        body = "\n\n".join([
            f"{machine_line()}; {args.seeds} seeds (training sample, val split and init), "
            f"test = the first {args.test_per_class} images of each class in the official test set, "
            f"{args.img_size} px, default `vpt train` settings" + (f" plus {extra}" if extra else "") + ".",
            table, summary,
        ])
        title = f"Accuracy: Fashion-MNIST, {args.shots} images per class, {args.img_size} px, DINOv2 ViT-S/14"
        write_section(args.section, title, body)


if __name__ == "__main__":
    main()
