"""Safe decoding: one upright RGB image per file, with size and aspect caps checked before any
pixel is decoded, and every PIL failure turned into one ImageLoadError with a reason."""
from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageOps

from vpt_cli.data.splits import Sample

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# Images that would decode to more pixels, or are thinner, are skipped (counted in training, one
# line in predict): a 1 x 20000 strip resized so its short side fits the model would take
# gigabytes. The pixel cap is on what is decoded: a JPEG read in draft mode decodes at 1/2, 1/4
# or 1/8 scale, so a 100-megapixel photo is fine when the model needs a few hundred pixels.
MAX_IMAGE_PIXELS = 178_956_970  # PIL's own decompression-bomb threshold (2 x Image.MAX_IMAGE_PIXELS)
MAX_ASPECT_RATIO = 40.0


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


class ImageLoadError(Exception):
    """One image cannot be decoded; callers skip it and report `reason`."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@contextmanager
def _pil_errors(path: Path) -> Iterator[None]:
    """Turn PIL's many failure modes (and decompression bombs) into ImageLoadError.

    PIL's bomb warning (header over Image.MAX_IMAGE_PIXELS) is silenced inside this block only:
    `_check_dimensions` applies that limit to the size actually decoded, after draft mode.
    Headers over twice the limit are still refused by PIL itself at open.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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


def load_image(path: Path, target: int | None = None) -> Image.Image:
    """Decode `path` as an upright RGB image (EXIF orientation applied, alpha on white).

    With `target`, a JPEG decodes at the smallest scale whose short side is still >= `target`
    (draft mode: the DCT does the shrinking), which is most of the cost of a large photo.
    """
    path = Path(path)
    with _pil_errors(path), Image.open(path) as image:
        _check_dimensions(path, image, target)
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))


def decode_image_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """`load_image` for bytes received over the network: the same caps, the same RGB result,
    so a served image is answered exactly as `vpt predict` answers the same file."""
    with _pil_errors(Path(name)), Image.open(io.BytesIO(data)) as image:
        _check_dimensions(Path(name), image)
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))


def _check_dimensions(path: Path, image: Image.Image, target: int | None = None) -> None:
    """Refuse, before any pixel is decoded, an image too thin to resize or one whose decoded size
    (after draft mode, asked for with `target`) is too large for memory."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(path, f"{width}x{height} pixels has no pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageLoadError(path, f"{width}x{height} pixels is too thin to resize (aspect ratio over "
                                   f"{MAX_ASPECT_RATIO:g}:1)")
    if target is not None:
        image.draft(image.mode, (target, target))  # JPEG only; a no-op for other formats
    cap = min(MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS)
    decoded_width, decoded_height = image.size
    if decoded_width * decoded_height > cap:
        drafted = f" (decoded {decoded_width}x{decoded_height})" if image.size != (width, height) else ""
        shown = f"{width}x{height} pixels{drafted}"
        raise ImageLoadError(path, f"{shown} is too large (at most {cap:,} decoded)")


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


def validate_samples(samples: list[Sample], target: int | None = None) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Cheaply check every image's header -> (good, bad), so bad files are reported up-front.

    Only headers are read (plus PNG checksums via verify), so truncated pixel data can still
    fail later; ImageDataset tolerates that. `target` is the short side loading will ask draft
    mode for, so the size cap judges what will actually be decoded.
    """
    good: list[Sample] = []
    bad: list[tuple[Path, str]] = []
    for sample in samples:
        try:
            with _pil_errors(sample.path), Image.open(sample.path) as image:
                _check_dimensions(sample.path, image, target)
                image.verify()
            good.append(sample)
        except ImageLoadError as exc:
            bad.append((sample.path, exc.reason))
    return good, bad


def failure_reason(path: Path) -> str:
    """Re-derive why `path` failed (workers cannot send strings back through the flag tensor)."""
    try:
        load_image(path)
    except ImageLoadError as exc:
        return exc.reason
    return "could not be read during loading (readable now)"
