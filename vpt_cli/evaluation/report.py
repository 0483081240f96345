"""`report.html`: one self-contained page per evaluation (inline images, no network, no script).

Metrics, the per-class table, the confusion matrix and reliability diagram, the most frequent
confusions, and a gallery of misclassified images, most confident mistakes first: the things a
person looks at to decide whether a task is good enough and what to fix in the data. A
multi-label task's page has its metrics, the per-class AP chart and table, and its worst images
(furthest from their labels) instead.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vpt_cli.data import ImageLoadError, load_image
from vpt_cli.evaluation.metrics import Calibration, EvalReport
from vpt_cli.evaluation.multilabel import MultiLabelReport

GALLERY_LIMIT = 60
THUMBNAIL = 112


@dataclass
class SamplePrediction:
    """One evaluated image: what it is, what the task said, and how sure it was."""

    file: str
    true: str
    predicted: str
    confidence: float


@dataclass
class LabelSetPrediction:
    """One evaluated image of a multi-label task: its labels, the task's, and every class's score."""

    file: str
    true: list[str]
    predicted: list[str]
    scores: list[float]  # in the task's class order
    error: float  # sum over classes of |label - score|: how far the image is from its labels


def render_report_html(*, title: str, report: EvalReport, calibration: Calibration,
                       predictions: list[SamplePrediction], images: dict[str, Path]) -> str:
    """The page as a string; `images` maps a caption to a PNG file to embed."""
    mistakes = sorted((p for p in predictions if p.true != p.predicted), key=lambda p: -p.confidence)
    sections = [
        f"<h1>{_e(title)}</h1>",
        _summary(report, calibration, len(mistakes)),
        _figures(images),
        _per_class(report),
        _top_confusions(report),
        _gallery(mistakes),
    ]
    return _PAGE.format(title=_e(title), body="\n".join(sections))


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _summary(report: EvalReport, calibration: Calibration, mistakes: int) -> str:
    return _cards([("images", str(report.num_samples)), ("top-1", _pct(report.top1)), ("top-5", _pct(report.top5)),
                   ("balanced accuracy", _pct(report.balanced_accuracy)), ("macro F1", f"{report.macro_f1:.3f}"),
                   ("ECE", _pct(calibration.ece)), ("mistakes", str(mistakes))])


def _cards(cells: list[tuple[str, str]]) -> str:
    return "<div class=cards>" + "".join(f"<div class=card><b>{_e(value)}</b><span>{_e(name)}</span></div>"
                                        for name, value in cells) + "</div>"


def _figures(images: dict[str, Path]) -> str:
    return "<div class=figs>" + "".join(
        f"<figure><img alt='{_e(caption)}' src='{_png_uri(path)}'><figcaption>{_e(caption)}</figcaption></figure>"
        for caption, path in images.items()) + "</div>"


def _per_class(report: EvalReport) -> str:
    rows = "".join(f"<tr><td>{_e(c.name)}</td><td>{c.precision:.3f}</td><td>{c.recall:.3f}</td><td>{c.f1:.3f}</td>"
                   f"<td>{c.support}</td></tr>" for c in sorted(report.per_class, key=lambda c: c.f1))
    return ("<h2>Per class (weakest first)</h2><table><tr><th>class</th><th>precision</th><th>recall</th>"
            f"<th>F1</th><th>support</th></tr>{rows}</table>")


def _top_confusions(report: EvalReport, limit: int = 10) -> str:
    pairs = sorted(((count, true, pred) for true, row in enumerate(report.confusion)
                    for pred, count in enumerate(row) if true != pred and count), reverse=True)[:limit]
    if not pairs:
        return "<h2>Top confusions</h2><p>No image was misclassified.</p>"
    rows = "".join(f"<tr><td>{_e(report.classes[t])}</td><td>{_e(report.classes[p])}</td><td>{count}</td>"
                   f"<td>{_pct(count / max(1, sum(report.confusion[t])))}</td></tr>" for count, t, p in pairs)
    return ("<h2>Top confusions</h2><table><tr><th>true</th><th>predicted as</th><th>images</th>"
            f"<th>share of the true class</th></tr>{rows}</table>")


def _gallery(mistakes: list[SamplePrediction]) -> str:
    captions = [f"<b>{_e(m.predicted)}</b> {_pct(m.confidence)}<br>true: {_e(m.true)}" for m in mistakes]
    return _tiles(f"Misclassified images ({len(mistakes)}), most confident first", [m.file for m in mistakes], captions)


def _tiles(heading: str, files: list[str], captions: list[str]) -> str:
    """A gallery of thumbnails (the first GALLERY_LIMIT) with their captions (HTML) and file names."""
    if not files:
        return ""
    tiles = []
    for file, caption in list(zip(files, captions))[:GALLERY_LIMIT]:
        try:
            thumb = f"<img alt='' src='{_thumbnail_uri(Path(file))}'>"
        except (ImageLoadError, OSError):
            thumb = "<div class=missing>unreadable</div>"
        tiles.append(f"<figure class=tile>{thumb}<figcaption>{caption}<br>"
                     f"<small title='{_e(file)}'>{_e(Path(file).name)}</small></figcaption></figure>")
    more = f"<p>{len(files) - GALLERY_LIMIT} more in predictions.csv.</p>" if len(files) > GALLERY_LIMIT else ""
    return f"<h2>{_e(heading)}</h2><div class=gallery>{''.join(tiles)}</div>{more}"


def render_multilabel_report_html(*, title: str, report: MultiLabelReport, predictions: list[LabelSetPrediction],
                                  images: dict[str, Path]) -> str:
    """A multi-label task's page: metrics, the `images` (the AP chart), the per-class table and
    the images furthest from their labels (the sum of |label - score| over classes) first."""
    worst = sorted((p for p in predictions if set(p.true) != set(p.predicted)), key=lambda p: -p.error)
    cards = _cards([("images", str(report.num_samples)), ("mAP", _pct(report.mean_ap)),
                    ("macro F1", f"{report.macro_f1:.3f}"), ("micro F1", f"{report.micro_f1:.3f}"),
                    ("exact match", _pct(report.exact_match)), ("Hamming loss", f"{report.hamming_loss:.4f}"),
                    ("images with a wrong label", str(len(worst)))])
    rows = "".join(f"<tr><td>{_e(c.name)}</td><td>{'-' if c.ap is None else f'{c.ap:.3f}'}</td><td>{c.f1:.3f}</td>"
                   f"<td>{c.precision:.3f}</td><td>{c.recall:.3f}</td><td>{c.support}</td><td>{c.threshold:.3f}</td></tr>"
                   for c in sorted(report.per_class, key=lambda c: (c.ap is not None, c.ap or 0.0)))
    table = ("<h2>Per class (weakest AP first)</h2><table><tr><th>class</th><th>AP</th><th>F1</th><th>precision</th>"
             f"<th>recall</th><th>support</th><th>threshold</th></tr>{rows}</table>")

    def caption(p: LabelSetPrediction) -> str:
        return (f"<b>{_e(', '.join(p.predicted) or 'none')}</b><br>true: {_e(', '.join(p.true) or 'none')}")

    gallery = _tiles(f"Images with a wrong label ({len(worst)}), furthest from their labels first",
                     [p.file for p in worst], [caption(p) for p in worst])
    sections = [f"<h1>{_e(title)}</h1>", cards, _figures(images), table, gallery]
    return _PAGE.format(title=_e(title), body="\n".join(sections))


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _thumbnail_uri(path: Path) -> str:
    image = load_image(path)
    image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=viewport content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 16px; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 18px; margin-top: 32px; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ border: 1px solid #ddd; border-radius: 8px; padding: 10px 16px; min-width: 110px; }}
.card b {{ display: block; font-size: 22px; }} .card span {{ color: #666; font-size: 13px; }}
.figs {{ display: flex; flex-wrap: wrap; gap: 24px; margin-top: 24px; align-items: flex-start; }}
figure {{ margin: 0; }} .figs img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 13px; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 4px 12px; border-bottom: 1px solid #eee; text-align: right; }}
td:first-child, th:first-child, td:nth-child(2) {{ text-align: left; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 14px; }}
.tile img, .missing {{ width: {size}px; height: {size}px; object-fit: contain; background: #f4f4f4; display: block; }}
.tile figcaption {{ word-break: break-word; }}
</style></head>
<body>
{body}
</body></html>
""".replace("{size}", str(THUMBNAIL))
