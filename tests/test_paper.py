"""benchmarks/paper.py runs the paper's protocol end to end on tiny synthetic sets in each layout."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from conftest import TINY_KWARGS
from test_readers import make_fgvc, make_vtab

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper  # noqa: E402


def write_cifar_binary(path: Path, per_class: int, classes: int = 5) -> None:
    """Records of 1 coarse byte, 1 fine byte and 3072 pixel bytes, as cifar-100-binary stores them."""
    rng = np.random.default_rng(0)
    records = [bytes([0, label]) + rng.integers(0, 256, 3072, dtype=np.uint8).tobytes()
               for label in range(classes) for _ in range(per_class)]
    path.write_bytes(b"".join(records))


def test_cifar_binary_is_read_from_raw_bytes(tmp_path):
    write_cifar_binary(tmp_path / "train.bin", per_class=2)
    images, labels = paper.read_cifar_binary(tmp_path / "train.bin")
    assert images.shape == (10, 32, 32, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [len(paper.longtail(paper.cifar_split(tmp_path, "train"), f, 2)) for f in (1, 2)] == [10, 6]  # 2 then 1 per class


def test_the_protocol_runs_on_every_layout(tiny_weights, tmp_path):
    make_vtab(tmp_path / "vtab" / "caltech101")
    make_fgvc(tmp_path / "fgvc" / "cub")
    (tmp_path / "cifar").mkdir()
    write_cifar_binary(tmp_path / "cifar" / "train.bin", per_class=4)
    write_cifar_binary(tmp_path / "cifar" / "test.bin", per_class=2)
    backbone_args = [arg for key, value in TINY_KWARGS.items() for arg in ("--backbone-arg", f"{key}={value}")]
    rows = paper.main(["--vtab", str(tmp_path / "vtab"), "--fgvc", str(tmp_path / "fgvc"),
                       "--cifar100", str(tmp_path / "cifar"), "--imbalance", "10", "--cifar-n-max", "4",
                       "--backbone", "vit_tiny_patch16_224", "--weights", str(tiny_weights), *backbone_args,
                       "--img-size", "32", "--prompts", "1", "--epochs", "1", "--batch-size", "8",
                       "--base-lrs", "1,10", "--weight-decays", "0", "--device", "cpu"])
    assert [row[0] for row in rows] == ["VTAB Natural", "FGVC", "CIFAR-100-LT 10 (test error)"]
    assert rows[0][3] == "78.48" and rows[2][3] == "10.4"
    assert all(0.0 <= float(row[2]) <= 100.0 for row in rows)
