"""The reader registry: what DATA is decides how it is read, and every reader ends in the same
`DatasetSplits` that train, sweep and eval use.

| format | DATA | reader |
| --- | --- | --- |
| folders | DATA/<class>/<image>, or train/ + val/ split folders of those | `folders.read_folders` |
| csv | a .csv file with path,label[,split] (path,labels[,split]: multi-label) | `lists.read_csv` |
| vtab | a folder with train800.txt / val200.txt / train800val200.txt / test.txt | `lists.read_vtab` |
| fgvc | a folder with train.json / val.json / test.json | `lists.read_fgvc` |

`auto` picks the first format whose files are there (folders last); a forced format whose files
are missing is a DataError naming them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vpt_cli.config import DATA_FORMATS
from vpt_cli.core.errors import DataError, UsageError
from vpt_cli.data.files import children, existing_dir
from vpt_cli.data.folders import read_folders, scan_class_folders
from vpt_cli.data.lists import FGVC_FILES, VTAB_FILES, Label, LabelFormat, Listing, read_csv, read_fgvc, read_vtab
from vpt_cli.data.splits import DatasetSplits, Sample, auto_source, missing_positives, stratified_split


@dataclass(frozen=True)
class ListReader:
    """A list-file format: how to recognise it and how to read it into a Listing."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, LabelFormat], Listing]
    expects: str  # what DATA must be, for the error when a forced format does not fit
    multi_label: bool = False  # whether its files can give an image several labels


LIST_READERS = {
    "csv": ListReader("csv", lambda p: p.is_file() and p.suffix.lower() == ".csv", read_csv,
                      "a .csv file with path and label columns", multi_label=True),
    "vtab": ListReader("vtab", lambda p: p.is_dir() and any((p / n).is_file() for n in VTAB_FILES.values()),
                       lambda root, _: read_vtab(root), f"a folder holding {', '.join(VTAB_FILES.values())}"),
    "fgvc": ListReader("fgvc", lambda p: p.is_dir() and any((p / n).is_file() for n in FGVC_FILES.values()),
                       lambda root, _: read_fgvc(root), f"a folder holding {', '.join(FGVC_FILES.values())}"),
}


def detect_format(root: Path, data_format: str = "auto") -> str:
    """The format to read DATA as: the forced one (checked to fit), else the first that fits."""
    if data_format not in DATA_FORMATS:
        raise UsageError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, not '{data_format}'")
    if not root.exists():
        raise DataError(f"data {root} does not exist; pass a folder of class folders, a .csv file, "
                        "or a folder of VTAB lists or FGVC JSON files")
    if data_format == "auto":
        return next((name for name, reader in LIST_READERS.items() if reader.detect(root)), "folders")
    if data_format in LIST_READERS and not LIST_READERS[data_format].detect(root):
        raise DataError(f"--data-format {data_format} needs {LIST_READERS[data_format].expects}; {root} is not")
    return data_format


def discover_splits(root: str | Path, val_split: float = 0.1, seed: int = 0, data_format: str = "auto",
                    trainval: bool = False, labels: LabelFormat = LabelFormat()) -> DatasetSplits:
    """Classes and train/val samples of DATA in any supported format.

    With `trainval` (list formats) the model trains on train+val (VTAB's train800val200) and is
    scored on the test split: the paper's final retrain after the search on val. A CSV with a
    `labels` column (or `labels.multi_label`) gives multi-label splits.
    """
    if not 0.0 <= val_split < 1.0:
        raise UsageError("--val-split must be in [0, 1)")
    root = Path(root).expanduser()
    data_format = detect_format(root, data_format)
    if data_format == "folders":
        if trainval:
            raise UsageError("--trainval needs a test split from list files (--data-format csv, vtab or fgvc); "
                             "with folders, train on train/ + val/ and evaluate test/ with vpt eval")
        _refuse_multi_label(data_format, labels)
        return read_folders(root, val_split, seed)
    return _splits_from(_read_listing(data_format, root, labels), val_split, seed, trainval)


def _read_listing(data_format: str, root: Path, labels: LabelFormat) -> Listing:
    _refuse_multi_label(data_format, labels)
    return LIST_READERS[data_format].read(root, labels)


def _refuse_multi_label(data_format: str, labels: LabelFormat) -> None:
    reader = LIST_READERS.get(data_format)
    if labels.multi_label and not (reader and reader.multi_label):
        raise UsageError(f"--multi-label needs a CSV (path,labels[,split]); {data_format} data has one label per image")


def _names(label: Label) -> tuple[str, ...]:
    """The class names one listed label holds."""
    return label if isinstance(label, tuple) else (label,)


def _encode(label: Label, index: dict[str, int], multi_label: bool) -> int | tuple[int, ...]:
    """A listed label as a Sample's: the class index, or the multi-hot tuple over `index`'s classes
    (names it does not know are left out)."""
    if not multi_label:
        return index[label]
    names = set(_names(label))
    return tuple(int(name in names) for name in index)


def _splits_from(listing: Listing, val_split: float, seed: int, trainval: bool) -> DatasetSplits:
    rows = listing.rows
    if trainval:
        train_rows = rows.get("trainval") or rows.get("train", []) + rows.get("val", [])
        val_rows, val_name = rows.get("test"), "test"
        if not train_rows:
            raise DataError(f"no readable training rows in {listing.root} for --trainval "
                            f"(looked for {listing.origin['trainval' if 'trainval' in listing.origin else 'train']})")
    else:
        train_rows, val_rows, val_name = rows.get("train"), rows.get("val"), "val"
        if not train_rows:
            raise DataError(f"no readable training rows in {listing.root}: no {listing.origin['train']}"
                            + _skipped_hint(listing))
    multi = listing.multi_label
    classes = (listing.classes if listing.classes is not None
               else sorted({name for _, label in train_rows for name in _names(label)}))
    if len(classes) < (1 if multi else 2):  # one class is a yes/no task when each is scored on its own
        raise DataError(f"need at least {1 if multi else 2} classes, found {len(classes)} in {listing.root}")
    index = {name: i for i, name in enumerate(classes)}
    train = [Sample(path, _encode(label, index, multi)) for path, label in train_rows]
    if val_rows is None:
        train, val = stratified_split(train, val_split, seed)
        source = f"{listing.source}, {auto_source(val_split, seed)}"
    else:
        unknown = sorted({name for _, label in val_rows for name in _names(label) if name not in index})
        if unknown:
            raise DataError(f"the {val_name} split of {listing.root} has classes not in train: {', '.join(unknown[:10])}")
        val = [Sample(path, _encode(label, index, multi)) for path, label in val_rows]
        source = f"{listing.source} ({'trainval' if trainval else 'train'} / {val_name})"
    lacking = missing_positives(train, classes) if multi else []
    if lacking:
        raise DataError(f"class {lacking[0]!r} has no positive image in the training split of {listing.root}"
                        + (f" (nor {len(lacking) - 1} more)" if len(lacking) > 1 else "")
                        + "; add examples of it or leave it out")
    return DatasetSplits(classes, train, val, source, listing.skipped, multi_label=multi)


def _skipped_hint(listing: Listing) -> str:
    if not listing.skipped:
        return ""
    path, reason = listing.skipped[0]
    return f" ({len(listing.skipped)} rows skipped; first: {path}: {reason})"


def read_eval_split(root: str | Path, classes: list[str], split: str | None = None, data_format: str = "auto",
                    labels: LabelFormat = LabelFormat()) -> tuple[list[Sample], list[tuple[Path, str]], list[str]]:
    """Samples of one split labelled by a trained task's `classes` -> (samples, skipped, unknown classes).

    Folders: DATA itself is class folders, or DATA/<split> with `split`. List formats: the named
    split, by default test (else val). Classes the task does not know are returned, their
    images left out; `labels.multi_label` (a multi-label task) reads every label cell as a set
    of names, keeps every image and drops only the unknown names from its labels.
    """
    root = Path(root).expanduser()
    data_format = detect_format(root, data_format)
    if data_format == "folders":
        _refuse_multi_label(data_format, labels)
        folder = root if split is None else _split_folder(root, split)
        _, samples, skipped, unknown = scan_class_folders(folder, classes)
        return samples, skipped, unknown
    listing = _read_listing(data_format, root, labels)
    if listing.multi_label and not labels.multi_label:
        raise DataError(f"{root} holds several labels per image; the task is single-label")
    wanted = split or ("test" if listing.rows.get("test") else "val")
    rows = listing.rows.get(wanted)
    if not rows:
        known = ", ".join(name for name in listing.rows if listing.rows[name]) or "none"
        raise DataError(f"no readable rows for split '{wanted}' in {listing.root} "
                        f"(looked for {listing.origin.get(wanted, wanted)}; splits found: {known})")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for _, label in rows for name in _names(label) if name not in index})
    multi = listing.multi_label
    samples = [Sample(path, _encode(label, index, multi)) for path, label in rows if multi or label in index]
    if not samples:
        raise DataError(f"none of the {wanted} rows of {listing.root} are of the task's classes "
                        f"(found: {', '.join(unknown[:10])})")
    return samples, listing.skipped, unknown


def _split_folder(root: Path, split: str) -> Path:
    folders, _ = children(existing_dir(root))
    match = next((folder for folder in folders if folder.name.lower() == split.lower()), None)
    if match is None:
        raise DataError(f"no '{split}' folder in {root} (folders: {', '.join(f.name for f in folders) or 'none'})")
    return match
