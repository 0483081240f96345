"""The reader registry: what DATA is decides how it is read, and every reader ends in the same
`DatasetSplits` that train, sweep and eval use.

| format | DATA | reader |
| --- | --- | --- |
| folders | DATA/<class>/<image>, or train/ + val/ split folders of those | `folders.read_folders` |
| csv | a .csv file with path,label[,split] | `lists.read_csv` |
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
from vpt_cli.data.lists import FGVC_FILES, VTAB_FILES, Listing, read_csv, read_fgvc, read_vtab
from vpt_cli.data.splits import DatasetSplits, Sample, auto_source, stratified_split


@dataclass(frozen=True)
class ListReader:
    """A list-file format: how to recognise it and how to read it into a Listing."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], Listing]
    expects: str  # what DATA must be, for the error when a forced format does not fit


LIST_READERS = {
    "csv": ListReader("csv", lambda p: p.is_file() and p.suffix.lower() == ".csv", read_csv,
                      "a .csv file with path and label columns"),
    "vtab": ListReader("vtab", lambda p: p.is_dir() and any((p / n).is_file() for n in VTAB_FILES.values()),
                       read_vtab, f"a folder holding {', '.join(VTAB_FILES.values())}"),
    "fgvc": ListReader("fgvc", lambda p: p.is_dir() and any((p / n).is_file() for n in FGVC_FILES.values()),
                       read_fgvc, f"a folder holding {', '.join(FGVC_FILES.values())}"),
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
                    trainval: bool = False) -> DatasetSplits:
    """Classes and train/val samples of DATA in any supported format.

    With `trainval` (list formats) the model trains on train+val (VTAB's train800val200) and is
    scored on the test split: the paper's final retrain after the search on val.
    """
    if not 0.0 <= val_split < 1.0:
        raise UsageError("--val-split must be in [0, 1)")
    root = Path(root).expanduser()
    data_format = detect_format(root, data_format)
    if data_format == "folders":
        if trainval:
            raise UsageError("--trainval needs a test split from list files (--data-format csv, vtab or fgvc); "
                             "with folders, train on train/ + val/ and evaluate test/ with vpt eval")
        return read_folders(root, val_split, seed)
    listing = LIST_READERS[data_format].read(root)
    return _splits_from(listing, val_split, seed, trainval)


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
    classes = listing.classes if listing.classes is not None else sorted({label for _, label in train_rows})
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes, found {len(classes)} in {listing.root}")
    index = {name: i for i, name in enumerate(classes)}
    train = [Sample(path, index[label]) for path, label in train_rows]
    if val_rows is None:
        train, val = stratified_split(train, val_split, seed)
        return DatasetSplits(classes, train, val, f"{listing.source}, {auto_source(val_split, seed)}", listing.skipped)
    unknown = sorted({label for _, label in val_rows if label not in index})
    if unknown:
        raise DataError(f"the {val_name} split of {listing.root} has classes not in train: {', '.join(unknown[:10])}")
    val = [Sample(path, index[label]) for path, label in val_rows]
    used = f"{'trainval' if trainval else 'train'} / {val_name}"
    return DatasetSplits(classes, train, val, f"{listing.source} ({used})", listing.skipped)


def _skipped_hint(listing: Listing) -> str:
    if not listing.skipped:
        return ""
    path, reason = listing.skipped[0]
    return f" ({len(listing.skipped)} rows skipped; first: {path}: {reason})"


def read_eval_split(root: str | Path, classes: list[str], split: str | None = None,
                    data_format: str = "auto") -> tuple[list[Sample], list[tuple[Path, str]], list[str]]:
    """Samples of one split labelled by a trained task's `classes` -> (samples, skipped, unknown classes).

    Folders: DATA itself is class folders, or DATA/<split> with `split`. List formats: the named
    split, by default test (else val). Classes the task does not know are returned, their
    images left out.
    """
    root = Path(root).expanduser()
    data_format = detect_format(root, data_format)
    if data_format == "folders":
        folder = root if split is None else _split_folder(root, split)
        _, samples, skipped, unknown = scan_class_folders(folder, classes)
        return samples, skipped, unknown
    listing = LIST_READERS[data_format].read(root)
    wanted = split or ("test" if listing.rows.get("test") else "val")
    rows = listing.rows.get(wanted)
    if not rows:
        known = ", ".join(name for name in listing.rows if listing.rows[name]) or "none"
        raise DataError(f"no readable rows for split '{wanted}' in {listing.root} "
                        f"(looked for {listing.origin.get(wanted, wanted)}; splits found: {known})")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in rows if label not in index})
    samples = [Sample(path, index[label]) for path, label in rows if label in index]
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
