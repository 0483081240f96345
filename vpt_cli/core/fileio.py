"""Atomic file writes: every artifact (task, checkpoint, CSV, PNG, config, export) goes through here."""
from __future__ import annotations

import json
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A fresh empty file beside `path` to write; renamed onto `path` when the block ends without
    an error, removed on every path out.

    Readers never see half a file, and a failure (or Ctrl-C) inside the block leaves `path` as it
    was. The data is flushed to disk before the rename and the rename before returning, so a
    power cut leaves the old file or the new one. The temporary file honours the umask
    (mkstemp's 0600 would survive the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a fresh file beside `path`, then rename it onto `path` (see atomic_target)."""
    with atomic_target(path) as tmp:
        write(tmp)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; folders cannot be opened on Windows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def numbered_dir(parent: str | Path, name: str, exist_ok: bool = False) -> Path:
    """A new folder `parent/name`, or `name2`, `name3`, ... when taken (Ultralytics' habit), so
    no run overwrites another; `exist_ok` reuses `parent/name` as it is."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    if exist_ok:
        (parent / name).mkdir(exist_ok=True)
        return parent / name
    for number in range(1, 100_000):
        candidate = parent / (name if number == 1 else f"{name}{number}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free run folder name for {parent / name}")


def strict_json(payload: Any) -> str:
    """Indented strict JSON text: a non-finite number (which JSON cannot hold) becomes null, and
    anything else JSON lacks (a Path) its string."""
    return json.dumps(_finite(payload), indent=2, default=str, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
