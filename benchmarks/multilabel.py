"""Multi-label: 2x2 mosaics of Fashion-MNIST, vpt-deep vs linear probe vs full fine-tune, real weights.

Each image is a 2x2 grid of 28 px tiles: 1 to 4 tiles hold garments of distinct classes (drawn
at random, seeded), the others are black; its labels are those classes. The mosaics and a CSV
(path,labels,split; ';' between labels) are written to a temporary folder, so runs go through the
multi-label csv reader. Each method is a default `vpt train` (library API) with `--method`,
thresholds tuned on the val split, then `vpt eval` on the test split: test mAP and macro F1 at
the stored thresholds, mean ± standard error over seeds (each seed draws its own mosaics and
initialisation). Rewrites the `multilabel` section of docs/benchmarks.md after every method, so a
run stopped early keeps what it measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DEFAULT_WEIGHTS, machine_line, markdown_table, pin_malloc, write_section  # noqa: E402

pin_malloc()
import numpy as np  # noqa: E402
from accuracy import CLASSES, FASHION, read_idx  # noqa: E402
from PIL import Image  # noqa: E402

from vpt_cli import api  # noqa: E402
from vpt_cli.config import load_config  # noqa: E402

BACKBONE = "vit_small_patch14_dinov2"
METHODS = ("linear", "vpt-deep", "full")
TILE = 28


def write_mosaics(root: Path, seed: int, counts: dict[str, int], images: np.ndarray, labels: np.ndarray) -> Path:
    """`counts[split]` mosaics per split from the Fashion-MNIST `images`, and labels.csv."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(len(CLASSES))]
    (root / "img").mkdir(parents=True)
    rows = ["path,labels,split"]
    number = 0
    for split, count in counts.items():
        for _ in range(count):
            classes = sorted(rng.choice(len(CLASSES), size=rng.integers(1, 5), replace=False).tolist())
            canvas = np.zeros((2 * TILE, 2 * TILE), dtype=np.uint8)
            for c, tile in zip(classes, rng.permutation(4)):
                row, col = divmod(int(tile), 2)
                canvas[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE] = images[rng.choice(by_class[c])]
            Image.fromarray(canvas).convert("RGB").save(root / "img" / f"{number}.png")
            rows.append(f"img/{number}.png,{';'.join(CLASSES[c] for c in classes)},{split}")
            number += 1
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def run(data: Path, method: str, args: argparse.Namespace, seed: int, work: Path) -> dict[str, float]:
    """A default `vpt train --method METHOD` (val: thresholds, selection), then `vpt eval` on test."""
    config = load_config(None, {"data.path": str(data), "backbone.name": BACKBONE, "backbone.weights": args.weights,
                                "backbone.img_size": args.img_size, "prompt.method": method,
                                "train.epochs": args.epochs, "train.seed": seed, "data.workers": 0})
    started = time.perf_counter()
    trained = api.train(config, task=str(work / f"s{seed}-{method}.safetensors"))
    seconds = time.perf_counter() - started
    report = api.evaluate(data, trained.task_path, output_dir=work / f"eval-{seed}-{method}", split="test",
                          workers=0).report
    return {"map": report.mean_ap, "macro_f1": report.macro_f1, "val_map": trained.val_report.mean_ap,
            "seconds": seconds}


def mean_se(values: list[float], scale: float = 100.0) -> str:
    if len(values) < 2:
        return f"{scale * values[0]:.1f}"
    return f"{scale * statistics.mean(values):.1f} ± {scale * statistics.stdev(values) / len(values) ** 0.5:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=240, help="training mosaics")
    parser.add_argument("--val", type=int, default=80, help="val mosaics (thresholds and selection)")
    parser.add_argument("--test", type=int, default=200, help="test mosaics")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, linear first")
    parser.add_argument("--epochs", type=int, default=10, help="vpt-deep and full fine-tune epochs")
    parser.add_argument("--img-size", type=int, default=56)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    images, labels = read_idx(FASHION / "train-images-idx3-ubyte.gz"), read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    counts = {"train": args.train, "val": args.val, "test": args.test}
    results: dict[str, list[dict[str, float]]] = {}
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datasets = [write_mosaics(work / f"s{seed}", seed, counts, images, labels) for seed in range(args.seeds)]
        for method in methods:
            for seed, data in enumerate(datasets):
                row = run(data, method, args, seed, work)
                results.setdefault(method, []).append(row)
                print(f"seed {seed} {method}: {row}", flush=True)
            report(results, args)


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    """Print the table of the methods measured so far and (unless --no-docs) write it to the docs."""
    table = markdown_table(
        ["method", "test mAP %", "test macro F1 %", "val mAP %", "train wall time (s)"],
        [[method, mean_se([r["map"] for r in rows]), mean_se([r["macro_f1"] for r in rows]),
          mean_se([r["val_map"] for r in rows]), mean_se([r["seconds"] for r in rows], scale=1.0)]
         for method, rows in results.items()])
    summary = reading(results)
    print(table, summary, sep="\n\n", flush=True)
    if not args.no_docs:
        body = "\n\n".join([
            f"{machine_line()}. {args.train} train / {args.val} val / {args.test} test mosaics of 2x2 Fashion-MNIST "
            f"tiles with 1-4 distinct classes each (10 classes), {args.seeds} seed(s) (mean ± standard error when "
            f"more than one), {args.img_size} px, {args.epochs} epochs, otherwise default `vpt train` settings "
            "(BCE, per-class positive weights from the default --balance, thresholds tuned on val).",
            table, summary])
        write_section("multilabel", "Multi-label: 2x2 Fashion-MNIST mosaics, DINOv2 ViT-S/14", body)


def reading(results: dict[str, list[dict[str, float]]]) -> str:
    """Each trained method against the linear probe on test mAP, written from the numbers."""
    probe = results.get("linear")
    lines = []
    for method in [m for m in results if m != "linear" and probe]:
        gaps = [r["map"] - p["map"] for r, p in zip(results[method], probe)]
        ahead = sum(gap > 0 for gap in gaps)
        lines.append(f"- {method} vs linear probe: {100 * statistics.mean(gaps):+.1f} points test mAP, "
                     f"ahead on {ahead} of {len(gaps)} seed(s).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
