"""The paper's protocol (Jia et al., ECCV 2022) on local copies of its benchmarks, beside its numbers.

Per dataset: search lr x weight decay on the val split with SGD and the paper's grid
(lr = base_lr * batch / 256, `vpt sweep`), retrain the winner on train+val (`vpt train
--trainval`, which holds the test split out of every selection), report test top-1.

Data (any subset; each is optional):
- `--vtab DIR`: one folder per VTAB-1k task in the list layout (train800.txt, val200.txt,
  train800val200.txt, test.txt); tasks are grouped Natural / Specialized / Structured by name.
- `--fgvc DIR`: one folder per FGVC set in the JSON layout (train.json, val.json, test.json).
- `--cifar100 PATH`: CIFAR-100 as image folders (train/<class>/, test/<class>/) or the raw
  `cifar-100-binary` folder (train.bin, test.bin: 1 coarse + 1 fine label byte and 3072 pixel
  bytes per image; never the pickled python version). Made long-tailed with the exponential
  profile at each `--imbalance`, tested on the balanced test set.

The paper's numbers are for ViT-B/16 ImageNet-21k; pass that backbone to compare like with like.
Meant for a GPU with the real data; it runs end to end on tiny synthetic sets (tests/test_paper.py).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vpt_cli import api
from vpt_cli.config import load_config

PAPER_BASE_LRS = (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05)
PAPER_WEIGHT_DECAYS = (0.01, 1e-3, 1e-4, 0.0)
PAPER_VPT_DEEP = {"FGVC": 89.11, "VTAB Natural": 78.48, "VTAB Specialized": 82.43, "VTAB Structured": 54.98}
# CIFAR-100-LT test error (%) as quoted in issue 13, read as: the larger the imbalance, the larger the error.
PAPER_CIFAR_LT_ERROR = {100.0: 19.0, 50.0: 15.2, 10.0: 10.4}
VTAB_GROUPS = {
    "VTAB Natural": ("caltech101", "cifar", "dtd", "oxford_flowers102", "flowers", "oxford_iiit_pet", "pets", "svhn",
                     "sun397"),
    "VTAB Specialized": ("patch_camelyon", "camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "retinopathy"),
    "VTAB Structured": ("clevr", "dmlab", "kitti", "dsprites", "smallnorb"),
}
CIFAR_RECORD = 2 + 3 * 32 * 32
CIFAR_N_MAX = 500  # images of the largest class in CIFAR-100-LT


def vtab_group(task: str) -> str:
    name = task.lower()
    return next((group for group, prefixes in VTAB_GROUPS.items() if name.startswith(prefixes)), "VTAB other")


def read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, fine labels) of one cifar-100-binary file, from raw bytes."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size % CIFAR_RECORD:
        raise SystemExit(f"{path} is not cifar-100-binary ({raw.size} bytes is not a whole number of records)")
    records = raw.reshape(-1, CIFAR_RECORD)
    return records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), records[:, 1].astype(np.int64)


def cifar_split(root: Path, split: str) -> list[tuple[object, str]]:
    """[(image or file, class name)] of CIFAR-100's `split` from either accepted copy."""
    if (root / f"{split}.bin").is_file():
        names_file = root / "fine_label_names.txt"
        names = names_file.read_text().split() if names_file.is_file() else [f"{i:03d}" for i in range(100)]
        images, labels = read_cifar_binary(root / f"{split}.bin")
        return [(image, names[label]) for image, label in zip(images, labels)]
    folder = root / split
    if not folder.is_dir():
        raise SystemExit(f"{root} holds neither {split}.bin (cifar-100-binary) nor a {split}/ folder of class folders")
    return [(file, cls.name) for cls in sorted(p for p in folder.iterdir() if p.is_dir())
            for file in sorted(cls.iterdir()) if file.is_file()]


def longtail(rows: list[tuple[object, str]], imbalance: float, n_max: int) -> list[tuple[object, str]]:
    """The first n_max * imbalance^(-c/(C-1)) images of class c (classes in sorted order)."""
    classes = sorted({name for _, name in rows})
    keep = {name: max(1, int(n_max * imbalance ** (-c / max(1, len(classes) - 1)))) for c, name in enumerate(classes)}
    kept, seen = [], dict.fromkeys(classes, 0)
    for item, name in rows:
        if seen[name] < keep[name]:
            kept.append((item, name))
            seen[name] += 1
    return kept


def write_csv(root: Path, splits: dict[str, list[tuple[object, str]]]) -> Path:
    """Images (arrays saved, files copied) under root and labels.csv with path,label,split."""
    lines = ["path,label,split"]
    for split, rows in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for index, (item, name) in enumerate(rows):
            target = root / split / f"{index:06d}.png"
            if isinstance(item, Path):
                target = target.with_suffix(item.suffix)
                shutil.copy(item, target)
            else:
                Image.fromarray(item).save(target)
            lines.append(f"{split}/{target.name},{name},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def protocol(data: Path, name: str, args: argparse.Namespace, work: Path) -> float:
    """Search on val, retrain on train+val, test top-1 (%)."""
    overrides = {"data.path": str(data), "backbone.name": args.backbone, "backbone.weights": args.weights,
                 "backbone.img_size": args.img_size, "backbone.kwargs": dict(args.backbone_kwargs) or None,
                 "prompt.method": args.method, "prompt.num_prompts": args.prompts, "train.optimizer": "sgd",
                 "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.device": args.device,
                 "data.augment": "none"}
    scale = args.batch_size / 256
    search = api.sweep(load_config(None, overrides), [b * scale for b in args.base_lrs], list(args.weight_decays),
                       [args.prompts], eta=args.eta, task=str(work / f"{name}-search.safetensors"))
    final = load_config(None, {**overrides, "data.trainval": True, "train.lr": search.best.lr,
                               "train.weight_decay": search.best.weight_decay})
    trained = api.train(final, task=str(work / f"{name}.safetensors"))
    print(f"{name}: best base lr {search.best.lr / scale:g}, wd {search.best.weight_decay:g}, "
          f"test top-1 {100 * trained.test_report.top1:.2f}", flush=True)
    return 100 * trained.test_report.top1


def subfolders(root: Path | None) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root else []


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vtab", type=Path)
    parser.add_argument("--fgvc", type=Path)
    parser.add_argument("--cifar100", type=Path)
    parser.add_argument("--imbalance", default="10,50,100")
    parser.add_argument("--cifar-n-max", type=int, default=CIFAR_N_MAX)
    parser.add_argument("--backbone", default="vit_base_patch16_224.augreg_in21k")
    parser.add_argument("--weights")
    parser.add_argument("--backbone-arg", action="append", default=[], metavar="KEY=INT")
    parser.add_argument("--img-size", type=int)
    parser.add_argument("--method", default="vpt-deep")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--base-lrs", default=",".join(f"{v:g}" for v in PAPER_BASE_LRS))
    parser.add_argument("--weight-decays", default=",".join(f"{v:g}" for v in PAPER_WEIGHT_DECAYS))
    parser.add_argument("--eta", type=int, default=3, help="successive halving of the search (1: every trial to the end)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    args.base_lrs = [float(v) for v in args.base_lrs.split(",")]
    args.weight_decays = [float(v) for v in args.weight_decays.split(",")]
    args.backbone_kwargs = [(k, int(v)) for k, _, v in (item.partition("=") for item in args.backbone_arg)]
    if not (args.vtab or args.fgvc or args.cifar100):
        parser.error("give at least one of --vtab, --fgvc, --cifar100")
    groups: dict[str, list[float]] = {}
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for task in subfolders(args.vtab):
            groups.setdefault(vtab_group(task.name), []).append(protocol(task, f"vtab-{task.name}", args, work))
        for task in subfolders(args.fgvc):
            groups.setdefault("FGVC", []).append(protocol(task, f"fgvc-{task.name}", args, work))
        for group, scores in groups.items():
            paper = PAPER_VPT_DEEP.get(group)
            rows.append([group, str(len(scores)), f"{statistics.mean(scores):.2f}", f"{paper:.2f}" if paper else "-"])
        if args.cifar100:
            train, test = cifar_split(args.cifar100, "train"), cifar_split(args.cifar100, "test")
            for imbalance in (float(v) for v in args.imbalance.split(",")):
                data = write_csv(work / f"cifar100-lt{imbalance:g}",
                                 {"train": longtail(train, imbalance, args.cifar_n_max), "test": test})
                error = 100 - protocol(data, f"cifar100-lt{imbalance:g}", args, work)
                paper = PAPER_CIFAR_LT_ERROR.get(imbalance)
                rows.append([f"CIFAR-100-LT {imbalance:g} (test error)", "1", f"{error:.2f}",
                             f"{paper:.1f}" if paper else "-"])
    print("| benchmark | tasks | ours (%) | paper, VPT-deep ViT-B/16 IN-21k (%) |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
