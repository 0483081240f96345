"""PNG pictures of evaluation and training results, drawn with Pillow only.

A confusion matrix or a learning curve is read at a glance where a JSON file is not. Pillow is
already a dependency (images are loaded with it), so nothing like matplotlib is pulled in for
two charts. Both writers replace the target atomically so a viewer never shows half a PNG.
"""
from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vpt_cli.core.fileio import atomic_write
from vpt_cli.evaluation.metrics import Calibration, EvalReport
from vpt_cli.evaluation.multilabel import MultiLabelReport

Color = tuple[int, int, int]
FontT = ImageFont.FreeTypeFont | ImageFont.ImageFont

WHITE: Color = (255, 255, 255)
INK: Color = (33, 33, 33)
MUTED: Color = (110, 110, 110)
GRID: Color = (228, 228, 228)
# White -> deep blue in perceptually even steps (the stops of the familiar "Blues" ramp).
BLUES: tuple[Color, ...] = ((255, 255, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107))
TRAIN_COLOR: Color = (31, 119, 180)
VAL_COLOR: Color = (230, 110, 0)
KEPT_COLOR: Color = (44, 160, 44)

MAX_LABEL_CHARS = 24  # longer class names are shortened in the middle (CSV/JSON keep them whole)
MIN_CELL_FOR_COUNTS = 16  # below this many pixels per cell the numbers would be unreadable
MIN_CELL_FOR_ZEROS = 40  # in dense matrices a sea of grey zeros hides the real confusions
MAX_AP_BARS = 60  # the weakest classes of a larger task (metrics.json has them all)


@lru_cache(maxsize=None)
def _font(size: int) -> FontT:
    """Pillow's bundled font, so the pictures look the same on every machine."""
    return ImageFont.load_default(size=size)


def _text_size(text: str, font: FontT) -> tuple[int, int]:
    """Pixel width and height of the box ``text`` covers when drawn in ``font``."""
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _draw_rotated(image: Image.Image, xy: tuple[int, int], text: str, font: FontT, fill: Color) -> None:
    """Draw ``text`` reading bottom-to-top with its bounding box's top-left corner at ``xy``."""
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(mask).text((1 - left, 1 - top), text, font=font, fill=255)
    mask = mask.rotate(90, expand=True)
    image.paste(Image.new("RGB", mask.size, fill), xy, mask)


@lru_cache(maxsize=4096)
def _has_glyph(char: str) -> bool:
    """Whether the bundled font draws ``char`` as itself rather than as its "missing" box."""
    def ink(c: str) -> bytes:
        canvas = Image.new("L", (48, 48), 0)
        ImageDraw.Draw(canvas).text((8, 8), c, font=_font(20), fill=255)
        return canvas.tobytes()

    return char.isspace() or ink(char) != ink("\uffff")


def _printable(text: str) -> str:
    """Fit ``text`` to the bundled font, which covers little beyond ASCII.

    Accents are dropped ("café" -> "cafe") and other missing glyphs become "?", which reads
    better than a row of boxes; the CSV and JSON keep the exact names.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c if _has_glyph(c) else "?" for c in kept)


def _shorten(name: str, limit: int = MAX_LABEL_CHARS) -> str:
    """Cut long names in the middle: class names often differ only in their suffix."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[-(limit - 1 - head):]


def _blue(value: float) -> Color:
    """Colour for a row fraction in [0, 1], interpolated between the BLUES stops."""
    value = min(max(value, 0.0), 1.0) * (len(BLUES) - 1)
    i = min(int(value), len(BLUES) - 2)
    t = value - i
    lo, hi = BLUES[i], BLUES[i + 1]
    return tuple(round(a + (b - a) * t) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _is_dark(color: Color) -> bool:
    """Whether white text reads better than dark text on ``color``."""
    r, g, b = color
    return 0.299 * r + 0.587 * g + 0.114 * b < 150


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", optimize=True))


def render_confusion_png(report: EvalReport, path: Path, title: str | None = None, normalized: bool = False) -> None:
    """Row-normalised confusion matrix with counts (or, `normalized`, each row's percentages),
    class names, captions and top-1 in the title.

    Cells shrink as classes grow (72 px for up to 10 classes, 14 px from 52 on), counts are
    hidden when cells get too small to hold them (zeros already below 40 px), and x labels turn
    vertical when they do not fit.
    """
    n = len(report.classes)
    cell = min(72, max(14, 720 // max(n, 1)))
    pad = 12
    label_font = _font(min(15, max(9, cell - 5)))
    count_font = _font(min(18, max(10, cell // 3)))
    title_font = _font(18)
    caption_font = _font(14)
    small_font = _font(12)

    labels = [_shorten(_printable(name)) for name in report.classes]
    label_w = max((_text_size(label, label_font)[0] for label in labels), default=0)
    label_h = _text_size("Ag", label_font)[1]
    vertical_x = label_w > cell - 6
    x_label_h = label_w if vertical_x else label_h

    heading = f"{_printable(title or 'Confusion matrix')}  ·  top-1 {report.top1:.1%}"
    subtitle = (
        f"balanced accuracy {report.balanced_accuracy:.1%}   n = {report.num_samples}   "
        "colour: share of each true class's row" + ("; numbers: row percentages" if normalized else "")
    )
    title_w, title_h = _text_size(heading, title_font)
    sub_w, sub_h = _text_size(subtitle, small_font)
    caption_h = _text_size("predicted", caption_font)[1]
    true_w = _text_size("true", caption_font)[0]

    grid_x = pad + caption_h + pad + label_w + 6
    grid_y = pad + title_h + 6 + sub_h + pad
    side = cell * n
    bar_x = grid_x + side + 16
    bar_w = 14
    bar_label_w = _text_size("100%", small_font)[0]
    width = max(bar_x + bar_w + 6 + bar_label_w + pad, pad + max(title_w, sub_w) + pad)
    height = grid_y + max(side, true_w) + 6 + x_label_h + 8 + caption_h + pad

    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), heading, font=title_font, fill=INK, anchor="la")
    draw.text((pad, pad + title_h + 6), subtitle, font=small_font, fill=MUTED, anchor="la")

    show_counts = cell >= MIN_CELL_FOR_COUNTS
    for t, row in enumerate(report.confusion):
        total = sum(row)
        for p, count in enumerate(row):
            x0, y0 = grid_x + p * cell, grid_y + t * cell
            color = _blue(count / total if total else 0.0)
            # Grid lines would outweigh the colours once cells get small.
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=color, outline=GRID if cell >= 20 else None)
            if not show_counts or (count == 0 and cell < MIN_CELL_FOR_ZEROS):
                continue
            text = f"{count / total:.0%}" if normalized and total else str(count)
            text_w, text_h = _text_size(text, count_font)
            if text_w > cell - 4 or text_h > cell - 4:
                continue
            ink = WHITE if _is_dark(color) else (INK if count else (185, 185, 185))
            draw.text((x0 + cell / 2, y0 + cell / 2), text, font=count_font, fill=ink, anchor="mm")
    draw.rectangle((grid_x - 1, grid_y - 1, grid_x + side, grid_y + side), outline=MUTED)

    for i, label in enumerate(labels):
        center = grid_x + i * cell + cell // 2
        draw.text((grid_x - 6, grid_y + i * cell + cell / 2), label, font=label_font, fill=INK, anchor="rm")
        if vertical_x:
            _draw_rotated(image, (center - label_h // 2 - 1, grid_y + side + 6), label, label_font, INK)
        else:
            draw.text((center, grid_y + side + 6), label, font=label_font, fill=INK, anchor="ma")

    caption_y = grid_y + max(side, true_w) + 6 + x_label_h + 8
    draw.text((grid_x + side / 2, caption_y), "predicted", font=caption_font, fill=MUTED, anchor="ma")
    _draw_rotated(image, (pad, grid_y + side // 2 - true_w // 2), "true", caption_font, MUTED)

    bar_h = max(side, 60)
    for y in range(bar_h):
        draw.line((bar_x, grid_y + y, bar_x + bar_w - 1, grid_y + y), fill=_blue(1 - y / (bar_h - 1)))
    draw.rectangle((bar_x - 1, grid_y - 1, bar_x + bar_w, grid_y + bar_h), outline=MUTED)
    for frac, anchor in ((1.0, "la"), (0.0, "ld")):
        y = grid_y + round((1 - frac) * bar_h)
        draw.text((bar_x + bar_w + 4, y), f"{frac:.0%}", font=small_font, fill=MUTED, anchor=anchor)

    _save_png_atomic(image, path)


def _nice_step(span: float, max_ticks: int) -> float:
    """Smallest 1/2/5 x 10^k step that splits ``span`` into at most ``max_ticks`` intervals."""
    raw = span / max(max_ticks, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _axis(lo: float, hi: float, max_ticks: int, integer: bool = False) -> tuple[float, float, list[float]]:
    """Axis limits with a 5% margin (so points do not sit on the frame) and round ticks inside.

    A flat series still gets a visible range around its value.
    """
    if hi - lo < 1e-12:
        spread = 1.0 if integer else max(abs(lo) * 0.1, 0.05)
        lo, hi = lo - spread, hi + spread
    else:
        margin = (hi - lo) * 0.05
        lo, hi = lo - margin, hi + margin
    step = _nice_step(hi - lo, max_ticks)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    count = math.floor((hi - first) / step + 1e-9) + 1
    return lo, hi, [first + i * step for i in range(count)]


def _format_tick(value: float, step: float, percent: bool) -> str:
    """Tick label with just enough decimals for ``step``."""
    if percent:
        value, step = value * 100, step * 100
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    text = f"{value:.{decimals}f}"
    return text + "%" if percent else text


Series = tuple[str, Color, list[tuple[float, float]]]


def _draw_panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: Sequence[Series],
    percent: bool,
    scale: int,
    x_label: str = "epoch",
) -> None:
    """One line chart inside ``box`` (left, top, right, bottom), with ticks, grid and legend."""
    tick_font, title_font = _font(12 * scale), _font(15 * scale)
    left, top, right, bottom = box
    draw.text((left + 58 * scale, top), title, font=title_font, fill=INK, anchor="la")  # legend: right
    plot = (left + 58 * scale, top + 28 * scale, right - 16 * scale, bottom - 40 * scale)
    px0, py0, px1, py1 = plot
    points = [pt for _, _, pts in series for pt in pts]
    if not points:
        draw.rectangle(plot, outline=MUTED, width=scale)
        draw.text(((px0 + px1) / 2, (py0 + py1) / 2), "no data", font=tick_font, fill=MUTED, anchor="mm")
        return

    x_lo, x_hi, xs = _axis(min(x for x, _ in points), max(x for x, _ in points), 8, integer=True)
    y_lo, y_hi, ys = _axis(min(y for _, y in points), max(y for _, y in points), 5)
    y_step = ys[1] - ys[0] if len(ys) > 1 else 1.0
    if percent:  # accuracies cannot leave [0, 1]; ticks past it would only mislead
        ys = [y for y in ys if -1e-9 <= y <= 1 + 1e-9] or ys

    def to_px(x: float, y: float) -> tuple[float, float]:
        fx, fy = (x - x_lo) / (x_hi - x_lo), (y - y_lo) / (y_hi - y_lo)
        return px0 + fx * (px1 - px0), py1 - fy * (py1 - py0)

    for y in ys:
        _, yy = to_px(x_lo, y)
        draw.line((px0, yy, px1, yy), fill=GRID, width=scale)
        draw.line((px0 - 5 * scale, yy, px0, yy), fill=MUTED, width=scale)
        text = _format_tick(y, y_step, percent)
        draw.text((px0 - 8 * scale, yy), text, font=tick_font, fill=MUTED, anchor="rm")
    for x in xs:
        xx, _ = to_px(x, y_lo)
        draw.line((xx, py1, xx, py1 + 5 * scale), fill=MUTED, width=scale)
        draw.text((xx, py1 + 8 * scale), f"{x:.0f}", font=tick_font, fill=MUTED, anchor="ma")
    draw.text(((px0 + px1) / 2, bottom), x_label, font=tick_font, fill=MUTED, anchor="md")
    draw.rectangle(plot, outline=MUTED, width=scale)

    for _, color, pts in series:
        pixels = [to_px(x, y) for x, y in pts]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2 * scale, joint="curve")
        if len(pixels) <= 60:
            r = 3 * scale
            for xx, yy in pixels:
                draw.ellipse((xx - r, yy - r, xx + r, yy + r), fill=color)

    # Legend in the header, right-aligned above the plot: it can never hide a curve there.
    x = px1
    for name, color, pts in reversed(series):
        if not pts:
            continue
        x -= _text_size(name, tick_font)[0]
        draw.text((x, top + 8 * scale), name, font=tick_font, fill=INK, anchor="lm")
        draw.line((x - 22 * scale, top + 8 * scale, x - 6 * scale, top + 8 * scale), fill=color, width=2 * scale)
        x -= 36 * scale


def _series(history: list[dict], key: str) -> list[tuple[float, float]]:
    """(epoch, value) pairs for ``key``, skipping missing and non-finite values."""
    points = []
    for row in history:
        value = row.get(key)
        if value is not None and math.isfinite(float(value)):
            points.append((float(row["epoch"]), float(value)))
    return points


def render_history_png(history: list[dict], path: Path, probe_acc: float | None = None,
                       kept_epoch: int | None = None) -> None:
    """Learning curves per epoch: train/val loss on the left, train/val accuracy on the right,
    with the linear-probe start as a flat grey line and the epoch kept as the task marked.

    Drawn at twice the size and downsampled, because Pillow's lines are not anti-aliased.
    """
    scale, width, height = 2, 980, 400
    image = Image.new("RGB", (width * scale, height * scale), WHITE)
    draw = ImageDraw.Draw(image)
    half = width * scale // 2
    margin = 14 * scale
    loss = [("train", TRAIN_COLOR, _series(history, "train_loss")), ("val", VAL_COLOR, _series(history, "val_loss"))]
    accuracy = [
        ("train", TRAIN_COLOR, _series(history, "train_acc")),
        ("val", VAL_COLOR, _series(history, "val_acc")),
    ]
    epochs = [row["epoch"] for row in history]
    if probe_acc is not None and epochs:
        accuracy.append(("probe", MUTED, [(0.0, probe_acc), (float(max(epochs)), probe_acc)]))
    kept = [(x, y) for x, y in _series(history, "val_acc") if x == kept_epoch]
    if kept:
        accuracy.append((f"kept: {kept_epoch}", KEPT_COLOR, kept))
    acc_values = [y for _, _, pts in accuracy for _, y in pts]
    percent = all(0.0 <= y <= 1.0 for y in acc_values)
    _draw_panel(draw, (margin, margin, half - margin, height * scale - margin), "loss", loss, False, scale)
    _draw_panel(
        draw, (half + margin, margin, width * scale - margin, height * scale - margin),
        "accuracy", accuracy, percent, scale,
    )
    _save_png_atomic(image.resize((width, height), Image.Resampling.LANCZOS), path)


def render_line_chart_png(series: Sequence[Series], path: Path, title: str, x_label: str) -> None:
    """One line chart of any (x, y) series (a benchmark's latency against load, say), drawn like the
    learning curves: twice the size, then downsampled."""
    scale, width, height = 2, 720, 420
    image = Image.new("RGB", (width * scale, height * scale), WHITE)
    margin = 14 * scale
    _draw_panel(ImageDraw.Draw(image), (margin, margin, width * scale - margin, height * scale - margin), title,
                series, False, scale, x_label=x_label)
    _save_png_atomic(image.resize((width, height), Image.Resampling.LANCZOS), path)


def render_labelled_image(image: Image.Image, lines: list[str], path: Path) -> None:
    """`image` (shrunk to at most 512 px, enlarged to at least 256) under a white band holding
    `lines`, one per task: what `vpt predict --save-dir` writes."""
    scale = min(512 / max(image.size), max(1.0, 256 / max(image.size)))
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    font = _font(14)
    line_height = 20
    width = max([image.width] + [_text_size(_printable(line), font)[0] + 16 for line in lines])
    canvas = Image.new("RGB", (width, image.height + line_height * len(lines) + 8), WHITE)
    canvas.paste(image.convert("RGB"), (0, line_height * len(lines) + 8))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((8, 4 + row * line_height), _printable(line), font=font, fill=INK)
    _save_png_atomic(canvas, path)


def render_reliability_png(result: Calibration, path: Path, title: str = "Reliability") -> None:
    """Accuracy against confidence per bin (bars), the diagonal of perfect calibration, bin sizes
    as a strip below, and the expected calibration error in the title."""
    pad, plot, strip = 48, 360, 40
    width, height = plot + 2 * pad, plot + strip + 3 * pad
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(12)
    draw.text((pad, 12), f"{_printable(title)}  ·  ECE {result.ece:.1%}", font=font, fill=INK)
    x0, y0 = pad, 2 * pad
    draw.rectangle((x0, y0, x0 + plot, y0 + plot), outline=MUTED)
    draw.line((x0, y0 + plot, x0 + plot, y0), fill=GRID, width=2)
    edges, most = result.bin_edges, max(result.bin_count + [1])
    for b, accuracy in enumerate(result.bin_accuracy):
        left, right = x0 + round(edges[b] * plot), x0 + round(edges[b + 1] * plot) - 1
        if accuracy is not None:
            draw.rectangle((left, y0 + plot - round(accuracy * plot), right, y0 + plot), fill=TRAIN_COLOR, outline=WHITE)
            gap_top = y0 + plot - round(result.bin_confidence[b] * plot)
            draw.line((left, gap_top, right, gap_top), fill=VAL_COLOR, width=2)
        share = result.bin_count[b] / most
        draw.rectangle((left, y0 + plot + pad // 2 + strip - round(share * strip), right, y0 + plot + pad // 2 + strip),
                       fill=_blue(0.3 + 0.7 * share))
    for tick in (0.0, 0.5, 1.0):
        draw.text((x0 + tick * plot, y0 + plot + 4), f"{tick:.1f}", font=small, fill=MUTED, anchor="ma")
        draw.text((x0 - 6, y0 + plot - tick * plot), f"{tick:.1f}", font=small, fill=MUTED, anchor="rm")
    draw.text((x0 + plot / 2, height - 14), "confidence (bars: accuracy, orange: mean confidence; strip: images per bin)",
              font=small, fill=MUTED, anchor="ms")
    _save_png_atomic(image, path)


def render_ap_png(report: MultiLabelReport, path: Path, title: str = "Average precision") -> None:
    """One horizontal bar per class with a positive, its AP (weakest first, at most MAX_AP_BARS),
    and mAP as a line and in the title."""
    rows = sorted(((c.ap, c.name) for c in report.per_class if c.ap is not None))[:MAX_AP_BARS]
    font, small = _font(16), _font(12)
    bar, pad, plot = 18, 16, 360
    names = [_shorten(_printable(name)) for _, name in rows]
    label_width = max([_text_size(name, small)[0] for name in names] + [40]) + 8
    width, height = pad + label_width + plot + 56, 48 + bar * len(rows) + 40
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((pad, 12), f"{_printable(title)}  ·  mAP {report.mean_ap:.1%}", font=font, fill=INK)
    x0, y0 = pad + label_width, 48
    for row, ((ap, _), name) in enumerate(zip(rows, names)):
        top = y0 + row * bar
        draw.text((x0 - 8, top + bar / 2), name, font=small, fill=INK, anchor="rm")
        draw.rectangle((x0, top + 2, x0 + round(ap * plot), top + bar - 2), fill=TRAIN_COLOR)
        draw.text((x0 + round(ap * plot) + 4, top + bar / 2), f"{ap:.2f}", font=small, fill=MUTED, anchor="lm")
    bottom = y0 + bar * len(rows)
    mean_x = x0 + round(report.mean_ap * plot)
    draw.line((mean_x, y0, mean_x, bottom), fill=VAL_COLOR, width=2)
    for tick in (0.0, 0.5, 1.0):
        draw.text((x0 + tick * plot, bottom + 4), f"{tick:.1f}", font=small, fill=MUTED, anchor="ma")
    draw.text((x0, height - 14), "AP per class (orange: mAP)", font=small, fill=MUTED, anchor="ls")
    _save_png_atomic(image, path)
