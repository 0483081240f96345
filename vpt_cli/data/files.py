"""Walking folders: hidden clutter, symlink loops and non-images handled the same way everywhere."""
from __future__ import annotations

import os
from pathlib import Path

from vpt_cli.core.errors import DataError
from vpt_cli.data.images import is_image

_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


def is_hidden(path: Path) -> bool:
    """OS clutter and dotfiles are never data and never worth a warning."""
    return path.name.startswith(".") or path.name.lower() in _JUNK_NAMES


def not_image_reason(path: Path) -> str:
    return f"not an image (extension '{path.suffix}')" if path.suffix else "not an image (no extension)"


def existing_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass a folder laid out as DATA/<class>/<image>")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder laid out as DATA/<class>/<image>")
    return root


def children(folder: Path) -> tuple[list[Path], list[Path]]:
    """Visible (sub-folders, files) of `folder`, sorted by name. A symlinked folder that points
    back at `folder` or above it (a loop, not a class) counts as neither."""
    entries = sorted(p for p in folder.iterdir() if not is_hidden(p))
    return ([p for p in entries if p.is_dir() and not _loops_back(p, folder)],
            [p for p in entries if not p.is_dir()])


def _loops_back(link: Path, folder: Path) -> bool:
    """Whether `link`, a child of `folder`, is a symlink to `folder` itself or one of its ancestors."""
    if not link.is_symlink():
        return False
    target, here = link.resolve(), folder.resolve()
    return here == target or target in here.parents


def walk_files(folder: Path) -> list[Path]:
    """All visible files below `folder`, recursively, in sorted path order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_hidden(Path(d))]
        found.extend(Path(dirpath, f) for f in filenames if not is_hidden(Path(f)))
    return sorted(found)


def images_in(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(images, skipped non-images) below `folder`."""
    files = walk_files(folder)
    return [f for f in files if is_image(f)], [(f, not_image_reason(f)) for f in files if not is_image(f)]
