"""`report.html`: one self-contained page per evaluation (inline images, no network, no script).

Metrics, the per-class table, the confusion matrix and reliability diagram, the most frequent
confusions, and a gallery of misclassified images, most confident mistakes first: the things a
person looks at to decide whether a task is good enough and what to fix in the data.
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

GALLERY_LIMIT = 60
THUMBNAIL = 112


@dataclass
class SamplePrediction:
    """One evaluated image: what it is, what the task said, and how sure it was."""

    file: str
    true: str
    predicted: str
    confidence: float


def render_report_html(*, title: str, report: EvalReport, calibration: Calibration,
                       predictions: list[SamplePrediction], images: dict[str, Path]) -> str:
    """The page as a string; `images` maps a caption to a PNG file to embed."""
    mistakes = sorted((p for p in predictions if p.true != p.predicted), key=lambda p: -p.confidence)
    sections = [
        f"<h1>{_e(title)}</h1>",
        _summary(report, calibration, len(mistakes)),
        "<div class=figs>" + "".join(
            f"<figure><img alt='{_e(caption)}' src='{_png_uri(path)}'><figcaption>{_e(caption)}</figcaption></figure>"
            for caption, path in images.items()) + "</div>",
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
    cells = [("images", str(report.num_samples)), ("top-1", _pct(report.top1)), ("top-5", _pct(report.top5)),
             ("balanced accuracy", _pct(report.balanced_accuracy)), ("macro F1", f"{report.macro_f1:.3f}"),
             ("ECE", _pct(calibration.ece)), ("mistakes", str(mistakes))]
    return "<div class=cards>" + "".join(f"<div class=card><b>{_e(value)}</b><span>{_e(name)}</span></div>"
                                        for name, value in cells) + "</div>"


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
    if not mistakes:
        return ""
    shown = mistakes[:GALLERY_LIMIT]
    tiles = []
    for mistake in shown:
        try:
            thumb = f"<img alt='' src='{_thumbnail_uri(Path(mistake.file))}'>"
        except (ImageLoadError, OSError):
            thumb = "<div class=missing>unreadable</div>"
        tiles.append(f"<figure class=tile>{thumb}<figcaption><b>{_e(mistake.predicted)}</b> "
                     f"{_pct(mistake.confidence)}<br>true: {_e(mistake.true)}<br>"
                     f"<small title='{_e(mistake.file)}'>{_e(Path(mistake.file).name)}</small></figcaption></figure>")
    more = f"<p>{len(mistakes) - len(shown)} more in predictions.csv.</p>" if len(mistakes) > len(shown) else ""
    return (f"<h2>Misclassified images ({len(mistakes)}), most confident first</h2>"
            f"<div class=gallery>{''.join(tiles)}</div>{more}")


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
