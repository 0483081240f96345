"""What `vpt predict` is given: files, folders and globs, or a CSV of image,task rows."""
from __future__ import annotations

import csv
import fnmatch
import glob
import os
from pathlib import Path

from vpt_cli.core.errors import UsageError
from vpt_cli.data.files import images_in, is_hidden
from vpt_cli.data.images import is_image

MAX_GLOB_ENTRIES = 1_000_000


def list_images(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand predict's inputs (files, folders, globs) -> (image files, [(arg, why nothing)]).

    A file named explicitly is kept whatever its extension (loading will tell); folders and
    globs contribute only visible files with image extensions. Duplicates are kept once.
    """
    found: dict[str, Path] = {}
    missing: list[tuple[str, str]] = []
    for arg in paths:
        images, reason = _expand_arg(arg)
        if not images:
            missing.append((arg, reason))
        for image in images:
            found.setdefault(os.path.abspath(image), image)
    return list(found.values()), missing


def _expand_arg(arg: str) -> tuple[list[Path], str]:
    """(images for one predict argument, reason when there are none)."""
    path = Path(arg).expanduser()
    if path.is_file():
        return [path], ""
    if path.is_dir():
        return images_in(path)[0], "folder has no images"
    if not any(c in arg for c in "*?["):
        return [], "no such file or folder"
    images: list[Path] = []
    for match in _glob(str(path)):
        if match.is_dir() and not match.is_symlink():  # a symlinked folder may loop back
            images += images_in(match)[0]
        elif is_image(match) and not is_hidden(match):
            images.append(match)
    return images, "no images match this pattern"


def read_task_requests(path: Path) -> tuple[list[Path], list[list[str]], list[tuple[str, str]]]:
    """`image,task` rows (header required; ';' separates several tasks in one cell) -> (files, tasks per file, failures).

    Relative image paths are relative to the CSV's folder, so the file can travel with its images.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read --tasks-from {path}: {exc}") from None
    if not rows or not {"image", "task"} <= set(rows[0]):
        raise UsageError(f"--tasks-from {path} needs a header with 'image' and 'task' columns")
    by_file: dict[Path, list[str]] = {}
    failures: list[tuple[str, str]] = []
    for line, row in enumerate(rows, 2):
        image, cell = (row.get("image") or "").strip(), (row.get("task") or "").strip()
        tasks = [name.strip() for name in cell.split(";") if name.strip()]
        if not image or not tasks:
            raise UsageError(f"--tasks-from {path}, line {line}: needs an image and a task")
        file = path.parent / Path(image).expanduser()
        if not file.is_file():
            failures.append((image, "no such file"))
            continue
        wanted = by_file.setdefault(file, [])
        wanted += [name for name in tasks if name not in wanted]
    return list(by_file), list(by_file.values()), failures


def _glob(pattern: str) -> list[Path]:
    """Paths matching a glob pattern (`*`, `?`, `[...]`, and `**` for any number of folders), in
    sorted order. Symlinked folders are not descended into, so a symlink loop cannot make the
    walk endless, and the walk stops with a UsageError after MAX_GLOB_ENTRIES entries."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    root, wanted = Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]
    if not wanted:
        return [root] if root.exists() else []
    if not root.is_dir():
        return []
    recursive = "**" in wanted
    matches, seen = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        names = dirnames + filenames
        if not recursive and depth + 1 >= len(wanted):
            dirnames[:] = []  # deeper entries cannot match a pattern without '**'
        for name in names:
            seen += 1
            if seen > MAX_GLOB_ENTRIES:
                raise UsageError(f"the pattern {pattern!r} walks more than {MAX_GLOB_ENTRIES:,} entries; narrow it")
            relative = here.relative_to(root).parts + (name,)
            if _matches(relative, wanted):
                matches.append(here / name)
    return sorted(matches)


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether path components `parts` match glob components `pattern` ('**' spans folders)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return _matches(parts, pattern[1:]) or (bool(parts) and _matches(parts[1:], pattern))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])
