"""Metrics against hand-computed numbers, and the PNG/CSV writers against their files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpt_cli.evaluation.metrics import (
    EvalReport,
    MetricAccumulator,
    classification_report,
    confusion_matrix,
    topk_accuracy,
    write_confusion_csv,
)
from vpt_cli.evaluation.plots import render_confusion_png, render_history_png

CLASSES3 = ["cat", "dog", "bird"]


def logits_for(preds: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose argmax is exactly ``preds``."""
    return torch.nn.functional.one_hot(torch.tensor(preds), num_classes).float() * 5


@pytest.fixture
def small_report() -> EvalReport:
    # true: 0 0 0 1 1 2 / pred: 0 0 1 1 2 2
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    return classification_report(logits_for([0, 0, 1, 1, 2, 2], 3), labels, CLASSES3, loss=0.25)


def test_hand_computed_report(small_report: EvalReport) -> None:
    r = small_report
    assert r.num_samples == 6
    assert r.top1 == pytest.approx(4 / 6)
    assert r.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert [c.precision for c in r.per_class] == pytest.approx([1.0, 0.5, 0.5])
    assert [c.recall for c in r.per_class] == pytest.approx([2 / 3, 0.5, 1.0])
    assert [c.f1 for c in r.per_class] == pytest.approx([0.8, 0.5, 2 / 3])
    assert [c.support for c in r.per_class] == [3, 2, 1]
    assert [c.name for c in r.per_class] == CLASSES3
    assert r.balanced_accuracy == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert r.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert r.loss == 0.25
    assert r.top5 is None


def test_confusion_matrix_is_true_by_pred() -> None:
    cm = confusion_matrix(torch.tensor([2, 2, 0]), torch.tensor([0, 1, 0]), 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 0, 1], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)


def test_topk_accuracy_by_hand() -> None:
    logits = torch.tensor(
        [[0.1, 0.5, 0.4, 0.0], [0.9, 0.05, 0.03, 0.02], [0.2, 0.3, 0.1, 0.4]]
    )
    labels = torch.tensor([2, 0, 2])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 3) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 4) == 1.0
    assert topk_accuracy(logits, labels, 10) == 1.0
    assert topk_accuracy(logits[:0], labels[:0], 1) == 0.0
    with pytest.raises(ValueError):
        topk_accuracy(logits, labels, 0)


def test_ties_count_like_argmax() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    # argmax picks the first maximum (0, then 1): top-1 must agree, so the result is deterministic.
    assert topk_accuracy(logits, torch.tensor([0, 1]), 1) == 1.0
    assert topk_accuracy(logits, torch.tensor([1, 2]), 1) == 0.0
    assert topk_accuracy(logits, torch.tensor([1, 2]), 2) == 1.0
    assert classification_report(logits, torch.tensor([0, 2]), CLASSES3).top1 == 0.5


def test_class_never_seen_nor_predicted_is_zero_and_excluded() -> None:
    r = classification_report(logits_for([0, 1, 1], 3), torch.tensor([0, 1, 0]), CLASSES3)
    bird = r.per_class[2]
    assert (bird.precision, bird.recall, bird.f1, bird.support) == (0.0, 0.0, 0.0, 0)
    assert r.balanced_accuracy == pytest.approx((0.5 + 1.0) / 2)
    # F1: cat 2*1*0.5/1.5 = 2/3, dog 2*0.5*1/1.5 = 2/3; bird occurs nowhere, so is left out.
    assert r.macro_f1 == pytest.approx(2 / 3)


def test_predicted_class_without_support() -> None:
    r = classification_report(logits_for([0, 2], 3), torch.tensor([0, 1]), CLASSES3)
    assert [c.precision for c in r.per_class] == [1.0, 0.0, 0.0]
    assert [c.recall for c in r.per_class] == [1.0, 0.0, 0.0]
    assert r.balanced_accuracy == pytest.approx(0.5)  # bird has no support: not averaged
    assert r.macro_f1 == pytest.approx(1 / 3)  # but it was predicted, so its F1 of 0 counts
    for value in (r.top1, r.balanced_accuracy, r.macro_f1, *[c.f1 for c in r.per_class]):
        assert value == value  # no NaN anywhere


def test_empty_input_gives_zeros() -> None:
    r = classification_report(torch.empty(0, 6), torch.empty(0, dtype=torch.long), list("abcdef"))
    assert (r.num_samples, r.top1, r.top5, r.balanced_accuracy, r.macro_f1) == (0, 0.0, 0.0, 0.0, 0.0)
    assert r.confusion == [[0] * 6 for _ in range(6)]
    assert all(c.precision == c.recall == c.f1 == 0.0 for c in r.per_class)
    empty = MetricAccumulator().report(CLASSES3)
    assert (empty.num_samples, empty.top1, empty.top5, empty.loss) == (0, 0.0, None, None)


def test_top5_only_from_five_classes() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    assert classification_report(torch.randn(4, 4), labels, list("abcd")).top5 is None
    r = classification_report(torch.randn(4, 5), labels, list("abcde"))
    assert r.top5 == 1.0


def _flat(value, prefix: str = "") -> dict:
    """Nested dicts/lists -> {"a.0.b": leaf}: pytest.approx compares flat mappings only (pytest 9)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def test_accumulator_matches_one_shot() -> None:
    g = torch.Generator().manual_seed(0)
    classes = [f"c{i}" for i in range(10)]
    logits = torch.randn(103, 10, generator=g)
    labels = torch.randint(0, 10, (103,), generator=g)
    logits[torch.arange(103), labels] += 1.0  # better than chance, so every metric is non-trivial
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    acc = MetricAccumulator()
    for idx in torch.arange(103).split(16):
        acc.update(logits[idx], labels[idx], loss_sum=losses[idx].sum())
    streamed = acc.report(classes)
    one_shot = classification_report(logits, labels, classes, loss=float(losses.mean()))

    assert streamed.loss == pytest.approx(one_shot.loss)
    assert streamed.top5 == pytest.approx(topk_accuracy(logits, labels, 5))
    assert _flat({**streamed.to_dict(), "loss": None}) == pytest.approx(_flat({**one_shot.to_dict(), "loss": None}))
    assert 0.0 < streamed.top1 < streamed.top5 < 1.0


def test_accumulator_rejects_inconsistent_input() -> None:
    acc = MetricAccumulator()
    acc.update(torch.randn(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError):
        acc.update(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        acc.update(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        acc.report(["only", "two"])
    partial = MetricAccumulator()
    partial.update(torch.randn(2, 3), torch.tensor([0, 1]), loss_sum=1.0)
    partial.update(torch.randn(2, 3), torch.tensor([0, 1]))
    assert partial.report(CLASSES3).loss is None  # a mean over half the samples would mislead


def test_to_dict_is_strict_json(small_report: EvalReport) -> None:
    data = json.loads(json.dumps(small_report.to_dict(), allow_nan=False))
    assert data["confusion"] == small_report.confusion
    assert data["per_class"][0] == {"name": "cat", "precision": 1.0, "recall": pytest.approx(2 / 3),
                                    "f1": pytest.approx(0.8), "support": 3}
    assert data["top5"] is None


def test_confusion_csv(small_report: EvalReport, tmp_path: Path) -> None:
    small_report.classes = ["cat", "dog, big", "bird"]  # a comma must not shift the columns
    path = tmp_path / "out" / "confusion.csv"
    path.parent.mkdir()
    path.write_text("stale")
    write_confusion_csv(small_report, path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["true\\pred", "cat", "dog, big", "bird"],
        ["cat", "2", "1", "0"],
        ["dog, big", "0", "1", "1"],
        ["bird", "0", "0", "1"],
    ]
    assert path.read_text().startswith("true\\pred,cat,")
    assert [p.name for p in path.parent.iterdir()] == ["confusion.csv"]  # no temp file left


def _random_report(num_classes: int, seed: int = 0) -> EvalReport:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_classes * 20,), generator=g)
    logits = torch.randn(labels.numel(), num_classes, generator=g)
    logits[torch.arange(labels.numel()), labels] += 2.0
    names = [f"class_{i}" for i in range(num_classes)]
    names[0] = "a_really_long_folder_name_for_the_first_class"
    return classification_report(logits, labels, names)


@pytest.mark.parametrize("num_classes", [2, 3, 10, 40, 100])
def test_confusion_png(num_classes: int, tmp_path: Path) -> None:
    path = tmp_path / "confusion.png"
    render_confusion_png(_random_report(num_classes), path, title="Validation")
    with Image.open(path) as image:
        assert image.format == "PNG"
        rgb = image.convert("RGB")
    side = num_classes * min(72, max(14, 720 // num_classes))  # the matrix alone
    assert side < rgb.width < side + 700 and side < rgb.height < side + 700
    colours = rgb.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # text, shades and frame, not a blank canvas
    pixels = np.asarray(rgb).reshape(-1, 3).astype(int)
    blueness = pixels[:, 2] - pixels[:, 0]
    assert blueness.max() > 60  # the row-normalised ramp reaches deep blue
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]


def test_confusion_png_of_empty_report(tmp_path: Path) -> None:
    classes = ["é", "日本", "x"]
    report = classification_report(torch.empty(0, 3), torch.empty(0, dtype=torch.long), classes)
    render_confusion_png(report, tmp_path / "c.png")
    filled = classification_report(logits_for([0, 1, 2], 3), torch.tensor([0, 1, 1]), classes)
    render_confusion_png(filled, tmp_path / "filled.png")
    with Image.open(tmp_path / "c.png") as empty, Image.open(tmp_path / "filled.png") as full:
        assert empty.size[1] == full.size[1]  # the same grid rows and labels, only the counts differ
        assert len(empty.convert("RGB").getcolors(1 << 16)) > 2  # grid and class names drawn, not a blank page
        assert empty.convert("RGB").tobytes() != full.convert("RGB").tobytes()


def test_history_png(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 2.0 / e, "train_acc": 1 - 0.5 / e, "val_acc": None if e % 2 else 0.8 - 0.2 / e}
        for e in range(1, 13)
    ]
    history[3]["train_loss"] = float("nan")  # a diverged step must not break the chart
    path = tmp_path / "history.png"
    render_history_png(history, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (980, 400)
        rgb = image.convert("RGB")
    extrema = rgb.getextrema()
    assert all(lo < 100 and hi == 255 for lo, hi in extrema)
    r, g, b = np.asarray(rgb).astype(int).transpose(2, 0, 1)
    orange = ((r > 200) & (g > 80) & (g < 140) & (b < 60)).sum()
    assert orange > 50  # the validation curve is drawn

    render_history_png([], tmp_path / "empty.png")
    with Image.open(tmp_path / "empty.png") as image:
        image.verify()


def test_calibration_by_hand() -> None:
    from vpt_cli.evaluation.metrics import calibration

    confidence = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.55, 0.55])
    correct = torch.tensor([True, False, True, True, True, False])
    result = calibration(confidence, correct, bins=10)
    # bin (0.9, 1]: acc 0.5 vs conf 0.95, 2 of 6; bin (0.5, 0.6]: acc 0.75 vs conf 0.55, 4 of 6
    assert result.ece == pytest.approx(2 / 6 * 0.45 + 4 / 6 * 0.2)
    assert result.bin_count[9] == 2 and result.bin_count[5] == 4 and sum(result.bin_count) == 6
    assert result.bin_accuracy[0] is None
    perfect = calibration(torch.tensor([1.0, 1.0]), torch.tensor([True, True]))
    assert perfect.ece == 0.0
