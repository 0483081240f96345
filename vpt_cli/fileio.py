"""Atomic file writes: every artifact (task, checkpoint, CSV, PNG, config) goes through here."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a fresh file beside `path`, then rename it onto `path`.

    Readers never see half a file, and a failure (or Ctrl-C) inside `write` leaves `path` as it
    was. The temporary file honours the umask (mkstemp's 0600 would survive the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
