"""`vpt eval` run folders: every file users expect, and a report.html that a real browser renders."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image
from typer.testing import CliRunner

from vpt_cli.artifact.schema import Task, TaskInfo, save_task
from vpt_cli.cli.app import app
from vpt_cli.config import PromptConfig
from vpt_cli.models.prompted import PromptedViT

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
CLASSES = sorted(p.name for p in (SAMPLE / "val").iterdir())
runner = CliRunner()


@pytest.fixture
def fashion_task(tiny_backbone, tiny_weights, tmp_path) -> Path:
    """A task on the sample classes with random prompts and head: plenty of mistakes to show."""
    torch.manual_seed(0)
    model = PromptedViT(tiny_backbone.model, len(CLASSES), PromptConfig("vpt-deep", 2))
    torch.nn.init.normal_(model.head.weight, std=2.0)
    info = TaskInfo(name="fashion", backbone=tiny_backbone.name, backbone_fingerprint=tiny_backbone.fingerprint,
                    img_size=32, data_config=json.loads(json.dumps(tiny_backbone.data_config, default=list)),
                    prompt=asdict(PromptConfig("vpt-deep", 2)), classes=CLASSES, backbone_kwargs=tiny_config().kwargs,
                    backbone_weights=str(tiny_weights))
    return save_task(Task(info, model.task_state_dict()), tmp_path / "fashion.safetensors")


def test_eval_writes_a_numbered_run_folder_with_every_file(fashion_task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(SAMPLE / "val"), "--task", str(fashion_task), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    run = Path("runs/eval/fashion")
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["metrics.json", "confusion.csv", "confusion.png", "confusion_normalized.png", "reliability.png",
         "predictions.csv", "report.html"])
    assert json.loads((run / "metrics.json").read_text()) == payload
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert len(rows) == payload["num_samples"] == 60
    assert sum(r["true"] == r["predicted"] for r in rows) == round(payload["top1"] * 60)
    assert 0.0 <= payload["ece"] <= 1.0
    with Image.open(run / "confusion.png") as counts, Image.open(run / "confusion_normalized.png") as shares:
        assert counts.tobytes() != shares.tobytes()

    page = (run / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    images = re.findall(r"<img alt='[^']*' src='([^']*)'", page)
    assert len(images) >= 3 and all(src.startswith("data:image/") for src in images)
    mistakes = [r for r in rows if r["true"] != r["predicted"]]
    assert f"Misclassified images ({len(mistakes)})" in page
    first = max(mistakes, key=lambda r: float(r["confidence"]))
    assert page.index(Path(first["file"]).name) < page.index("</html>")  # most confident mistake shown

    again = runner.invoke(app, ["eval", str(SAMPLE / "val"), "--task", str(fashion_task), "-q"])
    assert again.exit_code == 0 and Path("runs/eval/fashion2/report.html").is_file()  # not overwritten


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (.ci/run installs Debian's chromium)")
def test_report_renders_in_a_headless_browser(fashion_task, tmp_path):
    out = tmp_path / "eval"
    assert runner.invoke(app, ["eval", str(SAMPLE / "val"), "--task", str(fashion_task), "--output-dir", str(out),
                               "-q"]).exit_code == 0
    url = (out / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "Misclassified images" in dom.stdout and "Per class" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600", url],
                   capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        colours = image.convert("RGB").getcolors(1 << 20)
        assert colours is None or len(colours) > 50  # text, figures and thumbnails, not a blank page
