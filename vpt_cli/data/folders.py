"""The class-folder reader: DATA/<class>/<image>, or split folders (train/ plus val/...) of them."""
from __future__ import annotations

from pathlib import Path

from vpt_cli.core.errors import DataError, UsageError
from vpt_cli.data.files import children, existing_dir, images_in
from vpt_cli.data.images import IMAGE_EXTENSIONS, is_image
from vpt_cli.data.splits import DatasetSplits, Sample, auto_source, stratified_split

VAL_SPLIT_NAMES = ("val", "valid", "validation", "test")  # priority order


def _layout_error(root: Path, root_files: list[Path]) -> DataError:
    if any(is_image(f) for f in root_files):
        return DataError(
            f"{root} has images but no class folders; move them into one folder per class: "
            f"DATA/<class>/<image> (e.g. {root}/cat/1.jpg, {root}/dog/2.jpg)"
        )
    return DataError(f"no class folders in {root}; expected one folder per class: DATA/<class>/<image>")


def scan_class_folders(
    root: str | Path, classes: list[str] | None = None
) -> tuple[list[str], list[Sample], list[tuple[Path, str]], list[str]]:
    """Samples from `root/<class>/...` -> (classes, samples, skipped, unknown_classes).

    With `classes` given (a trained task's class list, for eval), labels follow that list and
    folders not in it are returned as `unknown_classes` with their images left out; classes may
    be missing or empty then. Without it, classes are the sorted folder names and every class
    must have images. Non-images next to the class folders (README, LICENSE) are not data and
    are not reported; images there are, as skipped.
    """
    root = existing_dir(root)
    folders, root_files = children(root)
    if not folders:
        raise _layout_error(root, root_files)
    skipped = [(f, "image outside a class folder") for f in root_files if is_image(f)]
    names = [f.name for f in folders]
    every_class_needs_images = classes is None
    if classes is None:
        classes = names
        if len(classes) < 2:
            raise DataError(
                f"need at least 2 classes, found only '{classes[0]}' in {root}; add a folder per class"
            )
    label_of = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in names if name not in label_of]
    samples: list[Sample] = []
    empty: list[str] = []
    for folder in folders:
        if folder.name not in label_of:
            continue
        images, not_images = images_in(folder)
        skipped += not_images
        samples += [Sample(path, label_of[folder.name]) for path in images]
        if not images:
            empty.append(folder.name)
    if not samples:
        hint = f" (folders not among the classes: {', '.join(unknown)})" if unknown else ""
        supported = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images found in {root}{hint}; supported: {supported}")
    if empty and every_class_needs_images:
        names_empty = ", ".join(empty)
        raise DataError(f"class folders without images in {root}: {names_empty}; add images or remove them")
    samples.sort(key=lambda s: (s.label, s.path))
    return list(classes), samples, skipped, unknown


def _find_split_dirs(folders: list[Path]) -> tuple[Path | None, Path | None]:
    """(train, val) split folders among `folders`, matched case-insensitively."""
    by_name = {f.name.lower(): f for f in folders}
    val = next((by_name[n] for n in VAL_SPLIT_NAMES if n in by_name), None)
    return by_name.get("train"), val


def read_folders(root: str | Path, val_split: float = 0.1, seed: int = 0) -> DatasetSplits:
    """Find classes and train/val samples in DATA (see module docstring for layouts)."""
    if not 0.0 <= val_split < 1.0:
        raise UsageError("--val-split must be in [0, 1)")
    root = existing_dir(root)
    folders, root_files = children(root)
    train_dir, val_dir = _find_split_dirs(folders)
    if train_dir is None:
        classes, samples, skipped, _ = scan_class_folders(root)
        train, val = stratified_split(samples, val_split, seed)
        return DatasetSplits(classes, train, val, auto_source(val_split, seed), skipped)
    skipped = [(f, "image outside train/ and val/") for f in root_files if is_image(f)]
    unused = [f for f in folders if f not in (train_dir, val_dir)]
    skipped += [(f, "folder not used: not the train or val split") for f in unused]
    classes, train, train_skipped, _ = scan_class_folders(train_dir)
    skipped += train_skipped
    if val_dir is None:
        train, val = stratified_split(train, val_split, seed)
        return DatasetSplits(classes, train, val, auto_source(val_split, seed), skipped)
    val, val_skipped = _scan_val(val_dir, classes)
    return DatasetSplits(classes, train, val, "folders", skipped + val_skipped)


def _scan_val(val_dir: Path, classes: list[str]) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Val samples labelled by the train classes; val-only classes are an error."""
    folders, _ = children(val_dir)
    unknown = [f.name for f in folders if f.name not in classes]
    if unknown:
        raise DataError(
            f"{val_dir} has classes not in train/: {', '.join(unknown)}; "
            f"add them to train/ or remove them from {val_dir.name}/"
        )
    _, samples, skipped, _ = scan_class_folders(val_dir, classes)
    return samples, skipped
