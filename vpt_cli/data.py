"""Finding, splitting and loading the user's image folders.

DATA is either `DATA/<class>/<image>` or has split folders (`train/` plus one of `val/`,
`valid/`, `validation/`, `test/`), each holding class folders. Files are never copied: splits
are lists of paths. Everything a user can fix raises `DataError` with a one-line hint; single
bad images are skipped and reported instead, so one corrupt file never stops a run.
"""
from __future__ import annotations

import csv
import fnmatch
import glob
import os
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torchvision import transforms

from vpt_cli.config import AUGMENTS
from vpt_cli.errors import DataError, UsageError
from vpt_cli.sharding import ShardedBatchSampler

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
VAL_SPLIT_NAMES = ("val", "valid", "validation", "test")  # priority order
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
_DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
_AUTO_WORKERS_MIN_ITEMS = 64
MAX_GLOB_ENTRIES = 1_000_000
# Larger or thinner images are skipped (counted in training, one line in predict): a 1 x 20000
# strip resized so its short side fits the model would take gigabytes.
MAX_IMAGE_PIXELS = 178_956_970  # PIL's own decompression-bomb threshold (2 x Image.MAX_IMAGE_PIXELS)
MAX_ASPECT_RATIO = 40.0


@dataclass
class Sample:
    """One image file and its class index."""

    path: Path
    label: int


@dataclass
class DatasetSplits:
    """What `discover_splits` found: classes, train/val samples, and what it left out."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    source: str
    skipped: list[tuple[Path, str]]


class ImageLoadError(Exception):
    """One image cannot be decoded; callers skip it and report `reason`."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# --- discovery -------------------------------------------------------------------------------


def _is_hidden(path: Path) -> bool:
    """OS clutter and dotfiles are never data and never worth a warning."""
    return path.name.startswith(".") or path.name.lower() in _JUNK_NAMES


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _not_image_reason(path: Path) -> str:
    return f"not an image (extension '{path.suffix}')" if path.suffix else "not an image (no extension)"


def _existing_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass a folder laid out as DATA/<class>/<image>")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder laid out as DATA/<class>/<image>")
    return root


def _children(folder: Path) -> tuple[list[Path], list[Path]]:
    """Visible (sub-folders, files) of `folder`, sorted by name. A symlinked folder that points
    back at `folder` or above it (a loop, not a class) counts as neither."""
    entries = sorted(p for p in folder.iterdir() if not _is_hidden(p))
    return ([p for p in entries if p.is_dir() and not _loops_back(p, folder)],
            [p for p in entries if not p.is_dir()])


def _loops_back(link: Path, folder: Path) -> bool:
    """Whether `link`, a child of `folder`, is a symlink to `folder` itself or one of its ancestors."""
    if not link.is_symlink():
        return False
    target, here = link.resolve(), folder.resolve()
    return here == target or target in here.parents


def _walk_files(folder: Path) -> list[Path]:
    """All visible files below `folder`, recursively, in sorted path order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _is_hidden(Path(d))]
        found.extend(Path(dirpath, f) for f in filenames if not _is_hidden(Path(f)))
    return sorted(found)


def _images_in(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(images, skipped non-images) below `folder`."""
    files = _walk_files(folder)
    return [f for f in files if _is_image(f)], [(f, _not_image_reason(f)) for f in files if not _is_image(f)]


def _layout_error(root: Path, root_files: list[Path]) -> DataError:
    if any(_is_image(f) for f in root_files):
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
    root = _existing_dir(root)
    folders, root_files = _children(root)
    if not folders:
        raise _layout_error(root, root_files)
    skipped = [(f, "image outside a class folder") for f in root_files if _is_image(f)]
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
        images, not_images = _images_in(folder)
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


def _stratified_split(
    samples: list[Sample], val_split: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out round(n * val_split) images per class, deterministically for a seed.

    Each class is shuffled with its own RNG seeded by (seed, label), so adding a class does not
    reshuffle the others. A class with >= 2 images keeps >= 1 train and gets >= 1 val image.
    """
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    train: list[Sample] = []
    val: list[Sample] = []
    for label, group in sorted(by_label.items()):
        n = len(group)
        n_val = min(max(round(n * val_split), 1), n - 1) if val_split > 0 and n >= 2 else 0
        order = list(range(n))
        random.Random(f"{seed}/{label}").shuffle(order)
        held = set(order[:n_val])
        train += [s for i, s in enumerate(group) if i not in held]
        val += [s for i, s in enumerate(group) if i in held]
    return train, val


def discover_splits(root: str | Path, val_split: float = 0.1, seed: int = 0) -> DatasetSplits:
    """Find classes and train/val samples in DATA (see module docstring for layouts)."""
    if not 0.0 <= val_split < 1.0:
        raise UsageError("--val-split must be in [0, 1)")
    root = _existing_dir(root)
    folders, root_files = _children(root)
    train_dir, val_dir = _find_split_dirs(folders)
    if train_dir is None:
        classes, samples, skipped, _ = scan_class_folders(root)
        train, val = _stratified_split(samples, val_split, seed)
        return DatasetSplits(classes, train, val, _auto_source(val_split, seed), skipped)
    skipped = [(f, "image outside train/ and val/") for f in root_files if _is_image(f)]
    unused = [f for f in folders if f not in (train_dir, val_dir)]
    skipped += [(f, "folder not used: not the train or val split") for f in unused]
    classes, train, train_skipped, _ = scan_class_folders(train_dir)
    skipped += train_skipped
    if val_dir is None:
        train, val = _stratified_split(train, val_split, seed)
        return DatasetSplits(classes, train, val, _auto_source(val_split, seed), skipped)
    val, val_skipped = _scan_val(val_dir, classes)
    return DatasetSplits(classes, train, val, "folders", skipped + val_skipped)


def _scan_val(val_dir: Path, classes: list[str]) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Val samples labelled by the train classes; val-only classes are an error."""
    folders, _ = _children(val_dir)
    unknown = [f.name for f in folders if f.name not in classes]
    if unknown:
        raise DataError(
            f"{val_dir} has classes not in train/: {', '.join(unknown)}; "
            f"add them to train/ or remove them from {val_dir.name}/"
        )
    _, samples, skipped, _ = scan_class_folders(val_dir, classes)
    return samples, skipped


def _auto_source(val_split: float, seed: int) -> str:
    return f"auto-split ({val_split * 100:.4g}% val, seed {seed})"


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
        return _images_in(path)[0], "folder has no images"
    if not any(c in arg for c in "*?["):
        return [], "no such file or folder"
    images: list[Path] = []
    for match in _glob(str(path)):
        if match.is_dir() and not match.is_symlink():  # a symlinked folder may loop back
            images += _images_in(match)[0]
        elif _is_image(match) and not _is_hidden(match):
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


# --- decoding --------------------------------------------------------------------------------


@contextmanager
def _pil_errors(path: Path) -> Iterator[None]:
    """Turn PIL's many failure modes (and decompression bombs) into ImageLoadError.

    Bomb warnings become errors only inside this block; PIL's pixel limit itself is untouched.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except ImageLoadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(path, f"too large, refused as a decompression bomb: {exc}") from None
        except FileNotFoundError:
            raise ImageLoadError(path, "file not found") from None
        except PermissionError:
            raise ImageLoadError(path, "permission denied") from None
        except Image.UnidentifiedImageError:
            raise ImageLoadError(path, "not a recognised image format") from None
        except Exception as exc:  # noqa: BLE001 - corrupt files raise OSError, SyntaxError, struct.error
            raise ImageLoadError(path, f"corrupt or truncated ({type(exc).__name__}: {exc})") from None


def load_image(path: Path) -> Image.Image:
    """Decode `path` as an upright RGB image (EXIF orientation applied, alpha on white)."""
    path = Path(path)
    with _pil_errors(path), Image.open(path) as image:
        _check_dimensions(path, image)
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))


def _check_dimensions(path: Path, image: Image.Image) -> None:
    """Refuse, from the header alone, an image too large to decode or too thin to resize."""
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise ImageLoadError(path, f"{width}x{height} pixels is too large (at most {MAX_IMAGE_PIXELS:,})")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageLoadError(path, f"{width}x{height} pixels is too thin to resize (aspect ratio over "
                                   f"{MAX_ASPECT_RATIO:g}:1)")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, so models always see 3 channels with 8-bit values."""
    if image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v / 256)
    if image.mode in ("I", "F"):
        image = _scale_to_8bit(image)
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """32-bit int/float pixels -> L, scaled by the maximum when it exceeds 255 (negatives clip to 0)."""
    high = image.getextrema()[1]
    if high > 255:
        image = image.point(lambda v: v * (255.0 / high))
    return image.convert("L")


def validate_samples(samples: list[Sample]) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Cheaply check every image's header -> (good, bad), so bad files are reported up-front.

    Only headers are read (plus PNG checksums via verify), so truncated pixel data can still
    fail later; ImageDataset tolerates that.
    """
    good: list[Sample] = []
    bad: list[tuple[Path, str]] = []
    for sample in samples:
        try:
            with _pil_errors(sample.path), Image.open(sample.path) as image:
                _check_dimensions(sample.path, image)
                image.verify()
            good.append(sample)
        except ImageLoadError as exc:
            bad.append((sample.path, exc.reason))
    return good, bad


# --- torch plumbing --------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Samples -> (tensor, label, index); an undecodable image yields None instead of crashing.

    Failures are flagged in a shared-memory tensor, so those hit inside DataLoader worker
    processes are visible in the main process through `failures`.
    """

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.samples = list(samples)
        self.transform = transform
        self._failed = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        sample = self.samples[index]
        try:
            image = load_image(sample.path)
        except ImageLoadError:
            self._failed[index] = True
            return None
        return self.transform(image), sample.label, index

    @property
    def failures(self) -> list[tuple[Path, str]]:
        """(path, reason) of every image that failed to load so far, in any process."""
        failed = [self.samples[i].path for i in self._failed.nonzero().flatten().tolist()]
        return [(path, failure_reason(path)) for path in failed]


def failure_reason(path: Path) -> str:
    """Re-derive why `path` failed (workers cannot send strings back through the flag tensor)."""
    try:
        load_image(path)
    except ImageLoadError as exc:
        return exc.reason
    return "could not be read during loading (readable now)"


def collate_skip_bad(
    batch: list[tuple[torch.Tensor, int, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Stack a batch without its failed items -> (images, labels, indices), or None if all failed."""
    good = [item for item in batch if item is not None]
    if not good:
        return None
    images, labels, indices = zip(*good)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices)


def auto_workers(num_items: int) -> int:
    """Loader processes: none for tiny datasets (start-up costs more than it saves)."""
    if num_items < _AUTO_WORKERS_MIN_ITEMS:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, workers: int | None, seed: int, drop_last: bool = False,
    persistent: bool = True, shard: tuple[int, int] = (0, 1),
) -> DataLoader:
    """A DataLoader that skips bad images and shuffles reproducibly for `seed` (its `generator`).

    `batch_size` is the global batch; with `shard` = (rank, world) this process loads only its
    slice of each one (vpt_cli.sharding), drawn from the same shuffle as a single process.
    """
    workers = auto_workers(len(dataset)) if workers is None else workers
    generator = torch.Generator()
    generator.manual_seed(seed)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_sampler=ShardedBatchSampler(BatchSampler(order, batch_size, drop_last), *shard),
        num_workers=workers,
        collate_fn=collate_skip_bad,
        generator=generator,
        persistent_workers=persistent and workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def build_transform(
    data_config: dict[str, Any], train: bool, augment: str = "flip"
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised tensor, following the backbone's timm data config.

    Eval (and augment "none") is timm's resize + center crop. "flip" adds only a random
    horizontal flip, which measured best on small folders; "crop" adds a mild random resized crop.
    """
    if augment not in AUGMENTS:
        raise UsageError(f"augment must be one of {', '.join(AUGMENTS)}, not '{augment}'")
    config = {key: data_config[key] for key in _DATA_CONFIG_KEYS if key in data_config}
    if train and augment == "crop":
        return create_transform(
            **config, is_training=True, scale=(0.5, 1.0), hflip=0.5, color_jitter=None, auto_augment=None
        )
    eval_transform = create_transform(**config, is_training=False)
    if not train or augment == "none":
        return eval_transform
    steps = list(eval_transform.transforms)
    to_tensor = next(i for i, s in enumerate(steps) if type(s).__name__ in ("MaybeToTensor", "ToTensor"))
    steps.insert(to_tensor, transforms.RandomHorizontalFlip(0.5))
    return transforms.Compose(steps)
