"""Readers of list files: a CSV of path,label[,split] (or path,labels[,split] for multi-label
tasks), VTAB-1k split lists and FGVC JSON files.

Each returns a `Listing` (labelled files per split, by class name), which `readers` turns into the
one splits object. Listed paths are relative to the list's folder and may not leave it; a row
that names no file, a missing file or a malformed line is skipped with its reason, never fatal.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vpt_cli.core.errors import DataError

SPLITS = ("train", "val", "trainval", "test")
CSV_SPLITS = ("train", "val", "test")
VTAB_FILES = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}
FGVC_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}
VTAB_CLASSES_FILE = "classes.txt"
FGVC_IMAGE_FOLDER = "images"


@dataclass(frozen=True)
class LabelFormat:
    """How a CSV's label cells read: one class name each, or (`multi_label`, and always for a
    `labels` column) any number of names split by `sep`, an empty cell being a negative for all."""

    multi_label: bool = False
    sep: str = ";"

    def split(self, cell: str) -> tuple[str, ...]:
        """The distinct names of one multi-label cell, in their order."""
        return tuple(dict.fromkeys(part.strip() for part in cell.split(self.sep) if part.strip()))


# One listed file's label: a class name, or a multi-label listing's tuple of names (maybe empty).
Label = str | tuple[str, ...]


@dataclass
class Listing:
    """Labelled files per split, as one list-file source holds them.

    `classes` is the index order when the source fixes one (VTAB's classes.txt, numeric ids);
    None means sorted class names of the train split. `origin` names where each split would come
    from, for error messages. A `multi_label` listing labels each file with a tuple of names.
    """

    root: Path
    source: str
    rows: dict[str, list[tuple[Path, Label]]]
    origin: dict[str, str]
    classes: list[str] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    multi_label: bool = False


def resolve_listed(text: str, bases: list[Path]) -> tuple[Path | None, str]:
    """A listed path -> (existing file, "") or (None, why not). It must be relative and stay inside
    the list's folder: `..` that leaves it, or an absolute path, is refused, not followed."""
    if not text:
        return None, "empty path"
    if os.path.isabs(text) or Path(text).drive:
        return None, "absolute path (list paths are relative to the list's folder)"
    normal = os.path.normpath(text)
    if normal == ".." or normal.startswith(".." + os.sep):
        return None, "path leads out of the list's folder"
    for base in bases:
        if (base / normal).is_file():
            return base / normal, ""
    return None, "no such file"


def _add(listing: Listing, split: str, text: str, label: Label, where: str, bases: list[Path]) -> None:
    """Append one row to `split`, or record why it is skipped."""
    file, reason = resolve_listed(text, bases)
    if file is None:
        listing.skipped.append((bases[0] / text, f"{where}: {reason}"))
    else:
        listing.rows.setdefault(split, []).append((file, label))


def read_csv(path: Path, labels: LabelFormat = LabelFormat()) -> Listing:
    """`path,label[,split]` rows with a header; labels are class names, split train/val/test
    (no split column: everything is train and is auto-split). A `labels` column instead (or
    `label` with `labels.multi_label`) holds several names per image, split by `labels.sep`."""
    listing = Listing(root=path.parent, source=f"csv ({path.name})", rows={},
                      origin={split: f"rows with split '{split}' in {path.name}" for split in CSV_SPLITS})
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip().lower() for name in reader.fieldnames or []]
            column = "labels" if "labels" in header else "label"
            missing = [name for name in ("path", column) if name not in header]
            if missing:
                raise DataError(f"{path} needs a header with 'path' and 'label' (or 'labels') columns "
                                f"(missing: {', '.join(missing)})")
            reader.fieldnames = header
            listing.multi_label = column == "labels" or labels.multi_label
            for line, row in enumerate(reader, 2):
                _csv_row(listing, row, column, labels, f"{path.name} line {line}")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    return listing


def _csv_row(listing: Listing, row: dict[str, str | None], column: str, labels: LabelFormat, where: str) -> None:
    text, cell = (row.get("path") or "").strip(), (row.get(column) or "").strip()
    split = (row.get("split") or "train").strip().lower() if "split" in row else "train"
    if split not in CSV_SPLITS:
        raise DataError(f"{where}: unknown split '{split}' (expected {', '.join(CSV_SPLITS)})")
    if listing.multi_label:  # an empty cell is an image of none of the classes
        _add(listing, split, text, labels.split(cell), where, [listing.root])
        return
    if not cell:
        listing.skipped.append((listing.root / text, f"{where}: no label"))
        return
    _add(listing, split, text, cell, where, [listing.root])


def read_vtab(root: Path) -> Listing:
    """VTAB-1k lists: `relative/path label_index` lines; names from classes.txt, else the indices."""
    names = _read_lines(root / VTAB_CLASSES_FILE) if (root / VTAB_CLASSES_FILE).is_file() else None
    listing = Listing(root=root, source="vtab lists", rows={}, origin=dict(VTAB_FILES))
    seen: set[int] = set()
    for split, name in VTAB_FILES.items():
        if not (root / name).is_file():
            continue
        for line, text in enumerate(_read_lines(root / name), 1):
            where = f"{name} line {line}"
            parts = text.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].isdigit():
                listing.skipped.append((root / name, f"{where}: expected 'path label_index'"))
                continue
            index = int(parts[1])
            if names is not None and index >= len(names):
                raise DataError(f"{root / name}, line {line}: unknown label {index} "
                                f"({VTAB_CLASSES_FILE} names {len(names)} classes)")
            seen.add(index)
            _add(listing, split, parts[0], names[index] if names is not None else str(index), where, [root])
    listing.classes = names if names is not None else [str(index) for index in sorted(seen)]
    return listing


def read_fgvc(root: Path) -> Listing:
    """FGVC JSON: {"relative/path.jpg": class_id, ...} per split, paths relative to the folder or
    to its images/ subfolder. Class names are the ids, in numeric order."""
    listing = Listing(root=root, source="fgvc json", rows={}, origin=dict(FGVC_FILES))
    seen: set[int] = set()
    for split, name in FGVC_FILES.items():
        if not (root / name).is_file():
            continue
        for text, value in _read_mapping(root / name).items():
            where = f"{name} entry '{text}'"
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
                listing.skipped.append((root / text, f"{where}: class id {value!r} is not a whole number"))
                continue
            seen.add(int(value))
            _add(listing, split, text, str(int(value)), where, [root, root / FGVC_IMAGE_FOLDER])
    listing.classes = [str(index) for index in sorted(seen)]
    return listing


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text list, stripped."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _read_mapping(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} must be a JSON object mapping image paths to class ids")
    return value
