"""What vpt eval leaves in its run folder: metrics.json, predictions.csv, the pictures and report.html, for single- and multi-label tasks; and the result object that lists them."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpt_cli.core.fileio import strict_json, write_text
from vpt_cli.evaluation.metrics import Calibration, EvalReport, write_confusion_csv
from vpt_cli.evaluation.multilabel import MultiLabelReport
from vpt_cli.evaluation.plots import render_ap_png, render_confusion_png, render_reliability_png
from vpt_cli.evaluation.report import (
    LabelSetPrediction,
    SamplePrediction,
    render_multilabel_report_html,
    render_report_html,
)


@dataclass
class EvalResult:
    task_name: str
    report: EvalReport | MultiLabelReport
    calibration: Calibration | None  # single-label tasks: of the top-1 confidence
    unknown_classes: list[str]
    skipped: list[tuple[str, str]]
    run_dir: Path
    files: dict[str, Path]  # what was written: metrics, confusion, reliability, predictions, report
    objective: str = "single-label"  # the task type (vpt_cli.objectives)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task_name, "objective": self.objective, **self.report.to_dict(), **({"ece": self.calibration.ece} if self.calibration else {}),
                "unknown_classes": self.unknown_classes,
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped], "run_dir": str(self.run_dir),
                "files": {key: str(path) for key, path in self.files.items()}}


def write_eval_files(result: EvalResult, answers: list[SamplePrediction], title: str) -> None:
    """Everything `evaluate` leaves in its run folder, report.html last (it embeds the pictures)."""
    out, files = result.run_dir, result.files
    files.update({"metrics": out / "metrics.json", "confusion_csv": out / "confusion.csv",
                  "confusion_png": out / "confusion.png", "confusion_normalized_png": out / "confusion_normalized.png",
                  "reliability_png": out / "reliability.png", "predictions": out / "predictions.csv",
                  "report": out / "report.html"})
    write_confusion_csv(result.report, files["confusion_csv"])
    render_confusion_png(result.report, files["confusion_png"], title=title)
    render_confusion_png(result.report, files["confusion_normalized_png"], title=title, normalized=True)
    render_reliability_png(result.calibration, files["reliability_png"], title=f"Reliability: {title}")
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["file", "true", "predicted", "confidence"])
    writer.writerows([a.file, a.true, a.predicted, f"{a.confidence:.6f}"] for a in answers)
    write_text(files["predictions"], table.getvalue())
    write_text(files["metrics"], strict_json(result.to_dict()))
    page = render_report_html(title=title, report=result.report, calibration=result.calibration, predictions=answers,
                              images={"confusion matrix": files["confusion_png"],
                                      "confusion matrix, row percentages": files["confusion_normalized_png"],
                                      "reliability": files["reliability_png"]})
    write_text(files["report"], page)


def write_multilabel_files(result: EvalResult, answers: list[LabelSetPrediction], title: str) -> None:
    """A multi-label evaluation's run folder: metrics.json, predictions.csv (file, true and
    predicted labels joined by ';', every class's score in the task's class order joined by ';'),
    ap.png and report.html."""
    out, files = result.run_dir, result.files
    files.update({"metrics": out / "metrics.json", "ap_png": out / "ap.png", "predictions": out / "predictions.csv",
                  "report": out / "report.html"})
    render_ap_png(result.report, files["ap_png"], title=f"AP: {title}")
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["file", "true", "predicted", "scores"])
    writer.writerows([a.file, ";".join(a.true), ";".join(a.predicted), ";".join(f"{s:.6f}" for s in a.scores)]
                     for a in answers)
    write_text(files["predictions"], table.getvalue())
    write_text(files["metrics"], strict_json(result.to_dict()))
    write_text(files["report"], render_multilabel_report_html(title=title, report=result.report, predictions=answers,
                                                              images={"average precision per class": files["ap_png"]}))
