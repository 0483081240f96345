"""What every training on a folder shares: the prepared run (data, loaders, backbone, run
folder) and the saving of a trained model as a task with its history.

`api.train` uses one prepared run per task; `sweep` shares one across all its trials (same data,
same frozen backbone), so the folder is scanned and the backbone loaded only once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vpt_cli.config import RunConfig
from vpt_cli.core.errors import DataError, UsageError
from vpt_cli.core.fileio import write_text
from vpt_cli.data import (
    DecodeCache,
    ImageDataset,
    LabelFormat,
    Sample,
    auto_workers,
    build_transform,
    class_counts,
    decode_size,
    discover_splits,
    few_shot,
    make_loader,
    validate_samples,
)
from vpt_cli.data.splits import DatasetSplits
from vpt_cli.evaluation.multilabel import FALLBACK_THRESHOLD
from vpt_cli.models.backbones import (
    Backbone,
    check_backbone_name,
    check_weights_file,
    check_weights_reachable,
    create_backbone,
)
from vpt_cli.objectives import Objective
from vpt_cli.objectives.balance import ClassBalance
from vpt_cli.objectives.multi_label import MultiLabel, positive_weights
from vpt_cli.objectives.single_label import SingleLabel
from vpt_cli.runtime import distributed
from vpt_cli.runtime.device import pick_device, seed_everything
from vpt_cli.runtime.reporting import Reporter
from vpt_cli.training.run_folder import ClaimedTask, write_skipped


@dataclass
class PreparedRun:
    """What any training on a folder needs, made once: checked data, loaders, backbone, run folder."""

    config: RunConfig
    task_path: Path
    name: str
    classes: list[str]
    split_source: str
    num_train: int
    num_val: int
    skipped: list[tuple[str, str]]
    run_dir: Path
    backbone: Backbone
    device: torch.device
    train_loader: Any
    probe_loader: Any
    val_loader: Any | None
    test_loader: Any | None  # --trainval: the test split, scored once after training
    class_counts: list[int]  # training images per class, as trained (after --shots and unreadable files)
    shot_files: list[str] | None  # the files --shots kept, relative to DATA; None without --shots
    multi_label: bool = False  # several labels per image (a CSV's labels column)

    def resolve(self, config: RunConfig) -> RunConfig:
        """`config` (a variant of this run's, as given: a sweep's trial) resolved as this run's was."""
        return config.resolve(self.backbone.facts, workers=self.config.data.workers)

    @property
    def objective(self) -> Objective:
        """What the run optimises: one label per image under its class balance, or several with
        binary losses (positive weights for a balance, --threshold or thresholds tuned on val)."""
        train = self.config.train
        balance = ClassBalance(train.balance, tuple(self.class_counts), train.tau)
        if not self.multi_label:
            return SingleLabel(balance)
        fixed = train.fixed_threshold  # None: tuned after training, FALLBACK_THRESHOLD until then
        return MultiLabel(loss_kind=train.loss, pos_weight=positive_weights(balance, self.num_train),
                          thresholds=(FALLBACK_THRESHOLD if fixed is None else fixed,) * len(self.classes),
                          tune=fixed is None)


def check_run(config: RunConfig) -> DatasetSplits:
    """Every refusal that needs no run folder, made before one is made or anything is printed: the
    settings, the backbone's family (from its timm name, before it is built), its weights (a
    readable local file, or the hub reachable), and the data (its format and splits, --shots).
    Returns the splits, which `prepare_run` then checks image by image."""
    config.validate()
    check_backbone_name(config.backbone.name)
    check_weights_reachable(config.backbone)
    check_weights_file(config.backbone)
    seed_everything(config.train.seed)
    splits = discover_splits(Path(config.data.path), config.data.val_split, config.train.seed,
                             data_format=config.data.format, trainval=config.data.trainval,
                             labels=LabelFormat(config.data.multi_label, config.data.label_sep))
    if splits.multi_label:
        _check_multi_label(config)
    if config.data.shot_count is not None:
        splits.train = few_shot(splits.train, config.data.shot_count, config.train.seed)
    return splits


def prepare_run(config: RunConfig, task: ClaimedTask, splits: DatasetSplits, reporter: Reporter) -> PreparedRun:
    """Check the images of `splits` (from `check_run`), load the backbone, resolve the config
    against it and build the loaders for a claimed task; the run folder gets args.yaml (the
    resolved config: what runs) and skipped.txt."""
    data_root = Path(config.data.path)
    task_path, name = task.path, task.name
    backbone = create_backbone(config.backbone)  # first: its input size says how far large photos are drafted
    eval_size = decode_size(backbone.data_config)
    train_size = decode_size(backbone.data_config, train=True, augment=config.data.augment)
    train_samples, bad_train = validate_samples(splits.train, target=min(eval_size, train_size))
    val_samples, bad_val = validate_samples(splits.val, target=eval_size)
    skipped = [(str(p), r) for p, r in splits.skipped + bad_train + bad_val]
    if not train_samples:
        raise DataError(f"no readable training images in {data_root}")
    patch = backbone.adapter.patch_size
    if backbone.img_size % patch:
        reporter.log(f"warning: the image size {backbone.img_size} is not a multiple of the {patch} px patch size: "
                     f"the last {backbone.img_size % patch} pixel rows and columns are never seen")
    run_dir = task.run_dir
    workers = config.data.workers  # as given: None lets each loader pick its own count
    config = config.resolve(backbone.facts, workers=workers if workers is not None else auto_workers(len(train_samples)))
    if distributed.is_main():
        write_text(run_dir / "args.yaml", config.to_yaml())
        write_skipped(run_dir, skipped)
    if skipped:
        reporter.log(f"skipped {len(skipped)} unreadable or non-image files (listed in {run_dir / 'skipped.txt'})")

    batch = config.train.batch_size
    if min(batch, len(train_samples)) < distributed.world_size():
        raise UsageError(f"{distributed.world_size()} processes need a global batch of at least as many training "
                         f"images (--batch-size {batch}, {len(train_samples)} training images)")
    if distributed.share_note(batch):
        reporter.log(distributed.share_note(batch))
    shard = distributed.shard()
    eval_transform = build_transform(backbone.data_config, train=False)
    eval_decode = DecodeCache(task.scratch, eval_size).load  # each photo decoded once per run, not once per epoch
    train_decode = DecodeCache(task.scratch, train_size).load
    # Fresh loader workers each pass (never persistent): train workers are seeded from the loader's
    # generator, which the checkpoint saves, so a resumed run augments exactly as the uninterrupted
    # one; and a pass that ends shuts its workers down, where persistent ones outlived the run until
    # a garbage collection, which then stalled 5 s per loader joining them.
    train_loader = make_loader(ImageDataset(train_samples, build_transform(backbone.data_config, True, config.data.augment),
                                            train_decode),
                               batch, shuffle=True, workers=workers, seed=config.train.seed,
                               drop_last=len(train_samples) > batch,
                               class_balanced=config.train.balance == "resample", shard=shard)
    probe_loader = make_loader(ImageDataset(train_samples, eval_transform, eval_decode), batch, False, workers,
                               config.train.seed, shard=shard)
    held_out = (make_loader(ImageDataset(val_samples, eval_transform, eval_decode), batch, False, workers,
                            config.train.seed, shard=shard) if val_samples else None)
    # --trainval holds out the test split: nothing may be selected on it (probe strength, epoch), it is only scored.
    val_loader, test_loader = (None, held_out) if config.data.trainval else (held_out, None)
    num_val = 0 if config.data.trainval else len(val_samples)
    return PreparedRun(config, task_path, name, splits.classes, splits.source, len(train_samples), num_val,
                       skipped, run_dir, backbone, pick_device(config.train.device), train_loader, probe_loader, val_loader,
                       test_loader=test_loader,
                       class_counts=class_counts(train_samples, len(splits.classes)),
                       shot_files=_relative(train_samples, data_root) if config.data.shot_count is not None else None,
                       multi_label=splits.multi_label)


def _check_multi_label(config: RunConfig) -> None:
    """Settings that would change or ignore a multi-label image's labels are refused."""
    if config.data.augment == "crop":
        raise UsageError("--augment crop can cut a labelled object out of a multi-label image; use flip or none")
    if config.train.balance == "resample":
        raise UsageError("--balance resample draws images by their class, which a multi-label image has several "
                         "of; use reweight (per-class positive weights)")


def _relative(samples: list[Sample], data_root: Path) -> list[str]:
    """Sample paths relative to DATA (to a list file's folder), so the record travels with the data."""
    base = data_root if data_root.is_dir() else data_root.parent
    return [os.path.relpath(sample.path, base) for sample in samples]
