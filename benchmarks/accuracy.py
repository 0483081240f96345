"""Test accuracy of linear / vpt-shallow / vpt-deep / vfpt / full on few-shot data sets, real weights.

Every run is a default `vpt train` (library API, only method, input size and seed changed) on a
folder of k training images per class written as PNGs, so it measures exactly what a user gets:
the same data pipeline, the 10% stratified val split, the default epoch selection. The task is
then loaded back from its file and scored on a fixed held-out sample of the official test set.
Each prompt method is compared with the linear probe seed by seed (same images, split and test
sample), so the verdict is a paired difference with its standard error; vfpt is compared with
vpt-deep the same way. Data sets (`--datasets`): Fashion-MNIST; the same with inverted colours
(light garments on black become dark on white: far from the backbone's pretraining photos, the
shift VFPT is meant for); and the repo's sample_data (4 classes of Fashion-MNIST-like photos,
scored on its val/ folder). Rewrites the `accuracy`
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
METHODS = ("linear", "vpt-shallow", "vpt-deep", "vfpt", "full")
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
DATASETS = ("fashion", "fashion-inverted", "sample")


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


Results = dict[tuple[str, int, int, str], list[dict[str, float]]]  # (data set, shots, px, method) -> seeds
BASELINES = {"vfpt": "vpt-deep"}  # what a method is compared with when not the linear probe


def paired_gains(results: Results, key: tuple[str, int, int, str], against: str = "linear") -> list[float]:
    """Test top-1 points of the method of `key` over `against`, seed by seed (same images, split, test)."""
    return [100 * (r["test"] - p["test"]) for r, p in zip(results[key], results[(*key[:3], against)])]


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def compared(results: Results, against: str = "linear") -> list[tuple[str, int, int, str]]:
    """The keys whose method is compared with `against` and that have it on the same setting."""
    return [key for key in results if key[3] != "linear" and BASELINES.get(key[3], "linear") == against
            and (*key[:3], against) in results]


def verdicts(results: Results) -> str:
    """One line per (data set, shots, size, method): its test accuracy against the linear probe's
    (vfpt: vpt-deep's) on the same seeds, as a paired mean difference."""
    lines = []
    for against in ("linear", "vpt-deep"):
        for key in compared(results, against):
            data, k, size, method = key
            gains = paired_gains(results, key, against)
            spread = f" ± {standard_error(gains):.1f} (standard error)" if len(gains) > 1 else ""
            name = "linear probe" if against == "linear" else against
            lines.append(f"- {data}, {k} shots/class, {size} px: {method} vs {name} {statistics.mean(gains):+.1f}"
                         f"{spread} points test top-1, ahead on {sum(g > 0 for g in gains)} of {len(gains)} seeds.")
    return "\n".join(lines)


def ratio_range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.0f}x" if round(low) == round(high) else f"{low:.0f}-{high:.0f}x"


def reading(results: Results) -> str:
    """What the table shows, written from the numbers so that it is regenerated with them."""
    sentences = []
    for method in ("vpt-deep", "vpt-shallow", "full", "vfpt"):
        against = BASELINES.get(method, "linear")
        keys = [key for key in compared(results, against) if key[3] == method]
        if not keys:
            continue
        gains = [paired_gains(results, key, against) for key in keys]
        ahead = sum(statistics.mean(g) > 0 for g in gains)
        clear = sum(statistics.mean(g) > 2 * standard_error(g) for g in gains)
        behind = sum(statistics.mean(g) < -2 * standard_error(g) for g in gains)
        slower = [statistics.mean(r["seconds"] for r in results[key]) /
                  statistics.mean(r["seconds"] for r in results[(*key[:3], against)]) for key in keys]
        label = "Default `vpt train` (vpt-deep)" if method == "vpt-deep" else f"`--method {method}`"
        if against == "linear":
            sentences.append(f"{label} is ahead of the linear probe on average in {ahead} of {len(keys)} settings, "
                             f"by more than two standard errors in {clear}, and trains {ratio_range(slower)} as long "
                             f"(the probe computes features once; {method} runs backward passes every epoch).")
        else:
            sentences.append(f"{label} is ahead of {against} on average in {ahead} of {len(keys)} settings, by more "
                             f"than two standard errors in {clear}, behind by more than two in {behind}, and its "
                             f"runs take {min(slower):.2f}-{max(slower):.2f}x as long.")
    both = [key[:3] for key in results if key[3] == "full" and (*key[:3], "vpt-deep") in results]
    if both:
        deep, full = (results[(*both[0], method)][0]["bytes"] for method in ("vpt-deep", "full"))
        sentences.append(f"At {both[0][2]} px a vpt-deep task file is {deep / 1e3:,.0f} KB against the full "
                         f"fine-tune's {full / 1e6:,.0f} MB.")
    if not sentences:
        return ""
    sentences.append("A difference within two standard errors of zero is not yet a result: more `--seeds` resolve it.")
    return "What it shows: " + " ".join(sentences)


def train_and_test(overrides: dict[str, object], task_path: Path, test: Path) -> dict[str, float]:
    """One default `vpt train` with `overrides`, then the saved task scored on the `test` folder."""
    started = time.perf_counter()
    with PeakRSS() as memory:
        trained = api.train(load_config(None, overrides), task=str(task_path))
    seconds = time.perf_counter() - started
    scored = api.evaluate(test, trained.task_path, output_dir=task_path.parent / "eval").report
    return {"test": scored.top1, "val": trained.val_report.top1 if trained.val_report else float("nan"),
            "seconds": seconds, "memory": memory.extra, "params": trained.trainable_params,
            "bytes": trained.task_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", default="10", help="training images per class, comma-separated (e.g. 10,50,100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (shots, size, method): sample, split and init")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--datasets", default=DATASETS[0], help=f"comma-separated, of {', '.join(DATASETS)}")
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
    datasets = args.datasets.split(",")
    results: Results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # (training pixels, test pixels) of each Fashion-MNIST variant; sample_data brings its own folders
        variants = {"fashion": (train_x, test_x), "fashion-inverted": (255 - train_x, 255 - test_x)}
        for data_set, k, size, seed in itertools.product(datasets, shots, sizes, range(args.seeds)):
            if data_set == "sample":  # its val/ folder is the test set; --shots draws k per class with the seed
                data, test, own = SAMPLE / "train", SAMPLE / "val", {"data.shots": k}
            else:
                pixels, test_pixels = variants[data_set]
                data, test, own = work / f"{data_set}_k{k}_s{seed}", work / f"{data_set}_test" / "images", {}
                if not test.exists():
                    write_folder(test, test_pixels, test_y, per_class(test_y, args.test_per_class, None))
                if not data.exists():
                    write_folder(data, pixels, train_y, per_class(train_y, k, np.random.default_rng(seed)))
            for method in methods:
                overrides = {"data.path": str(data), "backbone.name": "vit_small_patch14_dinov2",
                             "backbone.weights": args.weights, "backbone.img_size": size,
                             "prompt.method": method, "train.seed": seed, **own, **extra}
                task = work / f"{data_set}_k{k}_s{seed}_{size}px_{method}.safetensors"
                row = train_and_test(overrides, task, test)
                results.setdefault((data_set, k, size, method), []).append(row)
                print(f"{data_set} k={k} size={size} seed={seed} {method:11s} test {row['test']:.4f} "
                      f"val {row['val']:.3f} {row['seconds']:.0f}s +{row['memory'] / 2**20:.0f} MiB", flush=True)
    table = markdown_table(
        ["data", "shots/class", "px", "method", "test top-1 % (mean ± std)", "train wall time (s)", "peak train memory (MiB)",
         "trainable params", "task file"],
        [[data_set, str(k), str(size), method, mean_std([r["test"] for r in rows], 100),
          mean_std([r["seconds"] for r in rows], digits=0), f"{max(r['memory'] for r in rows) / 2**20:.0f}",
          f"{int(rows[0]['params']):,}", f"{rows[0]['bytes'] / 1e3:,.0f} KB"]
         for (data_set, k, size, method), rows in results.items()])
    summary = "\n\n".join(part for part in (verdicts(results), reading(results)) if part)
    print(table, summary, sep="\n\n")
    if not args.no_docs:
        body = "\n\n".join([
            f"{machine_line()}; {args.seeds} seeds (training sample, val split and init), "
            f"test = the first {args.test_per_class} images of each class in the official test set "
            "(colours inverted for fashion-inverted; sample: sample_data/val), "
            f"{args.img_size} px, default `vpt train` settings" + (f" plus {extra}" if extra else "") + ".",
            table, summary,
        ])
        title = f"Accuracy: {args.datasets}, {args.shots} images per class, {args.img_size} px, DINOv2 ViT-S/14"
        write_section(args.section, title, body)


if __name__ == "__main__":
    main()
