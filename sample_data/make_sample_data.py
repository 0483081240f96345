"""Regenerate sample_data/ from Fashion-MNIST, so the bundled images are reproducible.

Source: Debian's `dataset-fashion-mnist` package (MIT, (c) 2017 Zalando SE), installed at
/usr/share/datasets/fashion-mnist/. For each of four classes that look clearly different, the
first 40 images of that class in the official train file go to train/<class>/ and the first
15 in the official t10k (test) file go to val/<class>/. Files are 28x28 grayscale PNGs named
by their index in the source file (e.g. 00012.png).

    python sample_data/make_sample_data.py [--source DIR] [--out DIR]

Pixels are reproduced exactly; PNG bytes can differ with the zlib version.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import struct
from pathlib import Path

from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = {1: "trouser", 3: "dress", 7: "sneaker", 8: "bag"}  # Fashion-MNIST label -> folder
SPLITS = {"train": ("train", 40), "val": ("t10k", 15)}  # folder -> (source file prefix, per class)
SIDE = 28


def read_labels(path: Path) -> bytes:
    """One byte per image, after the IDX header (magic 2049, count)."""
    data = gzip.decompress(path.read_bytes())
    magic, count = struct.unpack(">II", data[:8])
    if magic != 2049:
        raise ValueError(f"{path} is not an IDX label file")
    return data[8 : 8 + count]


def read_images(path: Path) -> bytes:
    """Row-major 28x28 uint8 images, after the IDX header (magic 2051, count, rows, cols)."""
    data = gzip.decompress(path.read_bytes())
    magic, _, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051 or (rows, cols) != (SIDE, SIDE):
        raise ValueError(f"{path} is not a 28x28 IDX image file")
    return data[16:]


def first_indices(labels: bytes, label: int, count: int) -> list[int]:
    """Indices of the first `count` images with `label`, in file order."""
    return [i for i, value in enumerate(labels) if value == label][:count]


def write_split(source: Path, out: Path, prefix: str, per_class: int) -> None:
    """Write out/<class>/<index>.png for one split."""
    labels = read_labels(source / f"{prefix}-labels-idx1-ubyte.gz")
    images = read_images(source / f"{prefix}-images-idx3-ubyte.gz")
    size = SIDE * SIDE
    for label, name in CLASSES.items():
        folder = out / name
        folder.mkdir(parents=True)
        for index in first_indices(labels, label, per_class):
            pixels = images[index * size : (index + 1) * size]
            Image.frombytes("L", (SIDE, SIDE), pixels).save(folder / f"{index:05d}.png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the .gz files")
    here = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=here, help="where train/ and val/ are written")
    args = parser.parse_args()
    for folder, (prefix, per_class) in SPLITS.items():
        shutil.rmtree(args.out / folder, ignore_errors=True)
        write_split(args.source, args.out / folder, prefix, per_class)


if __name__ == "__main__":
    main()
