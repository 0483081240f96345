"""Photos decoded once per run: each image is decoded (JPEG draft mode) and shrunk to the size the
transforms need the first time it is read, and kept as an uncompressed file in a scratch folder.

Later epochs, the probe pass and the val loader read that small file instead of decoding the full
photo again. A file cache rather than memory, because loader worker processes are restarted
every epoch (exact resume) and a file is shared by all of them; writes are atomic, so two
processes decoding the same image at once both leave a whole file. Entries are keyed by path,
size and mtime, so an image changed during a run is decoded again.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image

from vpt_cli.data.images import load_image


class DecodeCache:
    """`load(path)` -> the upright RGB image with its short side at most `size` (never enlarged)."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = Path(folder)
        self.size = size

    def entry(self, path: Path) -> Path:
        stat = os.stat(path)
        key = f"{os.path.abspath(path)}\0{stat.st_mtime_ns}\0{stat.st_size}\0{self.size}"
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.ppm"

    def load(self, path: Path) -> Image.Image:
        try:
            entry = self.entry(path)
        except OSError:
            return load_image(path)  # raises the ImageLoadError that says why
        if entry.is_file():
            with Image.open(entry) as cached:
                cached.load()
                return cached
        image = shrink(load_image(path, target=self.size), self.size)
        temporary = entry.with_name(f"{entry.stem}.{os.getpid()}.tmp")
        try:
            image.save(temporary, format="PPM")
            os.replace(temporary, entry)
        except OSError:
            pass  # a full disk or a finished run's removed folder: the image is still good, just not kept
        return image


def shrink(image: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is `size` (aspect kept), only if it is larger."""
    width, height = image.size
    short = min(width, height)
    if short <= size:
        return image
    scale = size / short
    return image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC,
                        reducing_gap=3.0)
