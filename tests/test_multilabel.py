"""Multi-label tasks end to end: a CSV of label sets, BCE/ASL training on val mAP, per-class
thresholds tuned on val and validated in the task file, every metric against a hand computation,
predict formats, mixed single/multi-label batches and export metadata."""
from __future__ import annotations

import csv
import io
import json
import math
import random
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from PIL import Image
from timm.loss import AsymmetricLossMultiLabel
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.artifact.schema import load_task, read_task_info
from vpt_cli.cli.app import app
from vpt_cli.config import PromptConfig, RunConfig, TrainConfig
from vpt_cli.core.errors import DataError, TaskError, UsageError
from vpt_cli.data import Sample, discover_splits, few_shot, read_eval_split
from vpt_cli.data.lists import LabelFormat
from vpt_cli.evaluation.multilabel import average_precision, mean_average_precision, multilabel_report, tune_thresholds
from vpt_cli.export.metadata import export_metadata
from vpt_cli.objectives.balance import ClassBalance
from vpt_cli.objectives.multi_label import MultiLabel, positive_weights
from vpt_cli.serving.tasks import load_tasks
from vpt_cli.training.run_folder import RunFolder

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
runner = CliRunner()


def mosaic(labels: tuple[str, ...], rng: random.Random) -> Image.Image:
    """A 16 px image of 2x2 tiles: one tile per label at random places, grey elsewhere."""
    image = Image.new("RGB", (16, 16), (128, 128, 128))
    for name, tile in zip(labels, rng.sample(range(4), len(labels))):
        image.paste(Image.new("RGB", (8, 8), COLORS[name]), (8 * (tile % 2), 8 * (tile // 2)))
    return image


def write_dataset(root: Path, count: int = 36, sep: str = ";", column: str = "labels") -> Path:
    """root/labels.csv of `count` mosaics with 0-3 of the colours (every fourth row val, every
    sixth test), images in root/img."""
    rng = random.Random(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = [f"path,{column},split"]
    for i in range(count):
        labels = tuple(sorted(rng.sample(list(COLORS), rng.choice([0, 1, 1, 2, 2, 3]))))
        mosaic(labels, rng).save(root / "img" / f"{i}.png")
        split = "test" if i % 6 == 5 else "val" if i % 4 == 3 else "train"
        rows.append(f"img/{i}.png,{sep.join(labels)},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def run_config(weights: Path, data: Path, method: str = "vpt-deep", **train) -> RunConfig:
    config = RunConfig(backbone=tiny_config(weights=str(weights)),
                       train=TrainConfig(epochs=1, batch_size=16, select="best", **train))
    config.prompt = PromptConfig(method=method, num_prompts=2)
    config.data.path, config.data.workers = str(data), 0
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BCE vpt-deep multi-label task and a single-label linear task on the same tiny backbone."""
    from safetensors.torch import save_file

    from vpt_cli.models.backbones import create_backbone

    root = tmp_path_factory.mktemp("multilabel")
    torch.manual_seed(0)
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone(tiny_config(), pretrained=False).model.state_dict().items()},
              str(weights))
    data = write_dataset(root / "data")
    multi = api.train(run_config(weights, data), task=str(root / "colours.safetensors"),
                      folder=RunFolder(project=root / "runs"))
    single_csv = root / "data" / "single.csv"
    with data.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["labels"].count(";") == 0 and row["labels"]]
    single_csv.write_text("path,label,split\n" + "".join(f"{r['path']},{r['labels']},{r['split']}\n" for r in rows))
    single = api.train(run_config(weights, single_csv, method="linear"), task=str(root / "one.safetensors"),
                       folder=RunFolder(project=root / "runs"))
    return {"root": root, "weights": weights, "data": data, "multi": multi, "single": single}


# --- data ---------------------------------------------------------------------------------------


def test_a_labels_column_is_read_as_label_sets(tmp_path):
    splits = discover_splits(write_dataset(tmp_path))
    assert splits.multi_label and splits.classes == ["blue", "green", "red"]  # the sorted union
    assert all(isinstance(s.label, tuple) and len(s.label) == 3 for s in splits.train + splits.val)
    assert any(s.label == (0, 0, 0) for s in splits.train)  # an empty cell: a negative for every class
    assert len(splits.train) + len(splits.val) == 30  # test rows are not train or val


def test_label_sep_and_forced_multi_label_for_a_label_column(tmp_path):
    spaced = discover_splits(write_dataset(tmp_path / "a", sep=" "), labels=LabelFormat(sep=" "))
    assert spaced.multi_label and spaced.classes == ["blue", "green", "red"]
    plain = write_dataset(tmp_path / "b", column="label")
    assert discover_splits(plain, labels=LabelFormat(multi_label=True)).classes == ["blue", "green", "red"]
    as_single = discover_splits(plain)  # without --multi-label each cell is one class name
    assert not as_single.multi_label and any(";" in name for name in as_single.classes)
    with pytest.raises(UsageError, match="--multi-label needs a CSV"):
        discover_splits(tmp_path / "b" / "img", labels=LabelFormat(multi_label=True))


def test_a_class_without_a_training_positive_is_named(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "l.csv").write_text("path,labels,split\nimg/0.png,a,train\nimg/1.png,a;b,train\n"
                                    "img/2.png,,train\nimg/3.png,c,val\n")
    with pytest.raises(DataError, match="classes not in train: c"):
        discover_splits(tmp_path / "l.csv")
    # the auto-split stratifies by each image's rarest class; with this seed both 'b' images go to val
    (tmp_path / "l.csv").write_text("path,labels\nimg/0.png,a\nimg/1.png,a;b\nimg/2.png,0\nimg/3.png,0;b\n")
    with pytest.raises(DataError, match="class 'b' has no positive image in the training split"):
        discover_splits(tmp_path / "l.csv", val_split=0.5, seed=6)


def test_shots_keep_k_positives_per_class():
    samples = [Sample(Path(f"{i}"), hot) for i, hot in enumerate(
        [(1, 0, 0)] * 6 + [(1, 1, 0)] * 2 + [(0, 0, 1)] * 3 + [(0, 0, 0)] * 4)]
    kept = few_shot(samples, 2, seed=0)
    positives = [sum(s.label[c] for s in kept) for c in range(3)]
    assert min(positives) >= 2 and positives[1] == 2 and positives[2] == 2
    assert all(any(s.label) for s in kept)  # images without labels are left out
    assert few_shot(samples, 2, seed=0) == kept  # seeded


def test_eval_split_of_a_multi_label_task_keeps_images_and_drops_unknown_names(tmp_path):
    data = write_dataset(tmp_path)
    samples, _, unknown = read_eval_split(data, ["green", "red"], "test", labels=LabelFormat(multi_label=True))
    assert len(samples) == 6 and unknown == ["blue"] and all(len(s.label) == 2 for s in samples)
    with pytest.raises(DataError, match="single-label"):
        read_eval_split(data, ["green", "red"], "test")


# --- metrics against hand computations --------------------------------------------------------


def test_average_precision_by_hand():
    # ranked: + - + -  -> precision at the two positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    scores, targets = torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0])
    assert average_precision(scores, targets) == pytest.approx((1 + 2 / 3) / 2)
    # a tie enters together: {0.5, 0.5} hold one positive -> the one step has precision 1/2
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)
    assert average_precision(scores, torch.zeros(4)) is None
    # mAP: only classes with a positive count (class 1 has none)
    two = torch.stack([scores, scores], 1)
    assert mean_average_precision(two, torch.stack([targets, torch.zeros(4, dtype=torch.long)], 1)) == pytest.approx(5 / 6)


def test_every_report_metric_by_hand():
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.8, 0.6, 0.3], [0.1, 0.3, 0.9]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    report = multilabel_report(scores, targets, [0.5, 0.5, 0.5], ["a", "b", "c"], loss=1.25)
    # answered: [1,0,1] [0,1,0] [1,1,0] [0,0,1]
    # class a: tp 2 fp 0 fn 0; b: tp 1 fp 1 fn 0; c: tp 1 fp 1 fn 0
    a, b, c = report.per_class
    assert (a.precision, a.recall, a.f1, a.support) == (1.0, 1.0, 1.0, 2)
    assert (b.precision, b.recall, b.f1, b.support) == (0.5, 1.0, pytest.approx(2 / 3), 1)
    assert (c.precision, c.recall, c.f1) == (0.5, 1.0, pytest.approx(2 / 3))
    assert report.macro_f1 == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert report.macro_precision == pytest.approx(2 / 3) and report.macro_recall == 1.0
    assert (report.micro_precision, report.micro_recall) == (pytest.approx(4 / 6), 1.0)
    assert report.micro_f1 == pytest.approx(2 * 4 / (6 + 4))
    assert report.exact_match == 0.5  # images 0 and 1
    assert report.hamming_loss == pytest.approx(2 / 12)
    # AP: a ranks + + - - -> 1; b: 0.7(+) 0.6 0.3 0.2 -> 1; c: 0.9(-) 0.6(+) -> 1/2
    assert [m.ap for m in report.per_class] == [1.0, 1.0, 0.5]
    assert report.mean_ap == pytest.approx(2.5 / 3) and report.score == report.mean_ap
    assert report.loss == 1.25 and report.summary("val")["val_map"] == report.mean_ap


def test_thresholds_are_tuned_for_each_class_f1():
    # class 0: positives at 0.9 and 0.6, negatives at 0.7 and 0.2: F1 is best (0.8) answering
    # the top three (0.9, 0.7, 0.6) -> threshold halfway between 0.6 and 0.2
    # class 1: no positive -> 0.5; class 2: separable, best cut between 0.8 and 0.3
    scores = torch.tensor([[0.9, 0.1, 0.8], [0.7, 0.2, 0.3], [0.6, 0.3, 0.9], [0.2, 0.4, 0.1]])
    targets = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 0, 0]])
    assert tune_thresholds(scores, targets) == pytest.approx([0.4, 0.5, 0.55])
    objective = MultiLabel().tuned(torch.logit(scores), targets)
    assert objective.thresholds == pytest.approx((0.4, 0.5, 0.55))
    assert MultiLabel(tune=False).tuned(scores, targets).thresholds == ()  # --threshold: nothing tuned


# --- the objective --------------------------------------------------------------------------------


def test_losses_are_bce_or_timm_asl_with_positive_weights():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 3), torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0], [1, 0, 0]])
    weights = positive_weights(ClassBalance("reweight", (4, 1, 1)), num_images=6)
    assert weights == (0.5, 5.0, 5.0)  # negatives / positives
    assert positive_weights(ClassBalance("none", (4, 1, 1)), 6) is None
    bce = MultiLabel(pos_weight=weights)
    expected = F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=torch.tensor(weights),
                                                  reduction="sum")
    assert bce.loss(logits, targets, reduction="sum") == pytest.approx(expected.item())
    assert bce.loss(logits, targets) == pytest.approx(expected.item() / 6) and bce.batch_weight(targets) == 6
    asl = MultiLabel(loss_kind="asl")
    assert asl.loss(logits, targets, reduction="sum") == pytest.approx(
        AsymmetricLossMultiLabel(reduction="sum")(logits, targets.float()).item())
    assert asl.probe_loss(logits, targets) == pytest.approx(MultiLabel().loss(logits, targets).item())  # the probe fits BCE
    assert bce.eval_loss_sum(logits, targets) == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum").item())


def test_answers_are_the_classes_over_their_thresholds_or_the_top_k():
    objective = MultiLabel(thresholds=(0.5, 0.9, 0.2), tune=False)
    logits = torch.logit(torch.tensor([0.6, 0.8, 0.3, 0.99]))  # a padded row: the task has 3 classes
    assert [(name, round(p, 2)) for name, p in objective.answer(logits, ["a", "b", "c"], None)] == [("a", 0.6), ("c", 0.3)]
    assert [name for name, _ in objective.answer(logits, ["a", "b", "c"], 2)] == ["b", "a"]
    assert objective.answer(torch.full((3,), -9.0), ["a", "b", "c"], None) == []
    assert objective.correct(torch.logit(torch.tensor([[0.6, 0.1, 0.3], [0.6, 0.95, 0.1]])),
                             torch.tensor([[1, 0, 1], [1, 0, 0]])) == 1


# --- the task file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hostile", [None, "0.5", [0.5], [float("nan"), 0.5, 0.5], [-0.1, 0.5, 0.5],
                                     [1.5, 0.5, 0.5], [True, 0.5, 0.5], [0.5] * 4, {"a": 0.5}])
def test_hostile_thresholds_are_refused_in_one_line(trained, tmp_path, hostile):
    raw = Path(trained["multi"].task_path).read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    meta = json.loads(header["__metadata__"]["vpt_task"])
    meta["thresholds"] = hostile
    header["__metadata__"]["vpt_task"] = json.dumps(meta)  # NaN is written as NaN, which Python's JSON reads back
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    with pytest.raises(TaskError, match="thresholds must be 3 numbers in \\[0, 1\\], one per class") as caught:
        read_task_info(tmp_path / "bad.safetensors")
    assert "\n" not in str(caught.value)


def test_a_single_label_task_file_may_not_carry_thresholds(trained, tmp_path):
    info = read_task_info(trained["single"].task_path)
    assert info.objective == "single-label" and info.thresholds is None
    raw = Path(trained["single"].task_path).read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    meta = json.loads(header["__metadata__"]["vpt_task"])
    meta["thresholds"] = [0.5] * len(info.classes)
    header["__metadata__"]["vpt_task"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    with pytest.raises(TaskError, match="thresholds are only for multi-label tasks"):
        read_task_info(tmp_path / "bad.safetensors")


# --- training, eval, predict, export ---------------------------------------------------------------


def test_training_selects_on_val_map_and_stores_tuned_thresholds(trained):
    result = trained["multi"]
    info = load_task(result.task_path).info
    assert info.objective == "multi-label" and info.classes == ["blue", "green", "red"]
    assert len(info.thresholds) == 3 and all(0.0 <= t <= 1.0 for t in info.thresholds)
    objective = info.new_objective()
    assert isinstance(objective, MultiLabel) and list(objective.thresholds) == info.thresholds
    assert result.val_report.score_name == "mAP" and info.metrics["val_map"] == pytest.approx(result.val_report.mean_ap)
    assert [c.threshold for c in result.val_report.per_class] == pytest.approx(info.thresholds)
    header = (result.run_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert "val_map" in header and "val_macro_f1" in header and "val_acc" not in header
    for kept in ("best", "last"):  # the per-epoch files are usable tasks too (thresholds 0.5 until tuned)
        assert read_task_info(result.run_dir / f"{kept}.safetensors").thresholds == [0.5] * 3


def test_asl_trains_and_a_global_threshold_is_kept(trained, tmp_path):
    config = run_config(trained["weights"], trained["data"], loss="asl", threshold=0.3, balance="none", head_init="zeros")
    config.train.epochs = 1
    result = api.train(config, task=str(tmp_path / "asl.safetensors"), folder=RunFolder(project=tmp_path / "runs"))
    info = read_task_info(result.task_path)
    assert info.thresholds == [0.3] * 3 and info.provenance["config"]["train"]["loss"] == "asl"
    assert math.isfinite(result.history[0].train_loss) and 0.0 <= result.val_report.mean_ap <= 1.0


def test_multi_label_refuses_label_changing_settings(trained, tmp_path):
    for key, value, message in (("augment", "crop", "--augment crop"), ("balance", "resample", "resample")):
        config = run_config(trained["weights"], trained["data"])
        setattr(config.data if key == "augment" else config.train, key, value)
        with pytest.raises(UsageError, match=message):
            api.train(config, task=str(tmp_path / f"{key}.safetensors"), folder=RunFolder(project=tmp_path / "runs"))


def test_eval_writes_multi_label_metrics_predictions_and_report(trained, tmp_path):
    result = runner.invoke(app, ["eval", str(trained["data"]), "--task", str(trained["multi"].task_path), "--split",
                                 "test", "--output-dir", str(tmp_path / "eval"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    for key in ("mean_ap", "micro_f1", "macro_f1", "micro_precision", "micro_recall", "exact_match", "hamming_loss"):
        assert 0.0 <= payload[key] <= 1.0
    assert payload["objective"] == "multi-label" and payload["num_samples"] == 6
    assert {"name", "ap", "f1", "support", "threshold"} <= set(payload["per_class"][0])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean_ap"] == payload["mean_ap"]
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    assert list(rows[0]) == ["file", "true", "predicted", "scores"] and len(rows) == 6
    assert all(len(row["scores"].split(";")) == 3 for row in rows)
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "average precision per class" in page and "Per class (weakest AP first)" in page
    assert (tmp_path / "eval" / "ap.png").is_file()


def test_predict_formats_show_the_labels_over_threshold(trained, tmp_path):
    images = sorted((Path(trained["data"]).parent / "img").iterdir())[:6]
    task = str(trained["multi"].task_path)
    server = load_tasks([task], device="cpu")
    expected = server.predict([Image.open(p) for p in images], server.names[0])
    as_csv = runner.invoke(app, ["predict", *map(str, images), "--task", task, "--format", "csv", "-q"])
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(rows[0]) == ["file", "task", "rank", "class", "prob"] if rows else True
    assert len(rows) == sum(len(answer) for answer in expected)  # one row per label over its threshold
    as_json = json.loads(runner.invoke(app, ["predict", *map(str, images), "--task", task, "--json", "-q"]).stdout)
    assert [[(t["class"], pytest.approx(t["prob"])) for t in p["top"]] for p in as_json["predictions"]] == expected
    top2 = json.loads(runner.invoke(app, ["predict", *map(str, images), "--task", task, "--json", "-k", "2", "-q"]).stdout)
    assert all(len(p["top"]) == 2 for p in top2["predictions"])
    table = runner.invoke(app, ["predict", *map(str, images), "--task", task, "-q"])
    assert table.exit_code == 0 and images[0].name in table.stdout


def test_mixed_single_and_multi_label_batches_equal_separate_runs(trained):
    images = [str(p) for p in sorted((Path(trained["data"]).parent / "img").iterdir())[:5]]
    multi, single = str(trained["multi"].task_path), str(trained["single"].task_path)
    mixed = api.predict(images, [multi, single], top_k=3, batch_size=4, device="cpu", workers=0)
    alone = {path: api.predict(images, path, top_k=3, device="cpu", workers=0) for path in (multi, single)}
    by_task = {name: [p for p in mixed.predictions if p.task == name] for name in mixed.tasks}
    for path, separate in alone.items():
        together = by_task[separate.tasks[0]]
        assert [p.file for p in together] == [p.file for p in separate.predictions]
        for a, b in zip(together, separate.predictions):
            assert [name for name, _ in a.top] == [name for name, _ in b.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) <= 1e-5
    own = api.predict(images, [multi, single], device="cpu", workers=0)  # each task's own answer
    classes = len(load_task(single).info.classes)
    assert all(len(p.top) == min(3, classes) for p in own.predictions if p.task == alone[single].tasks[0])
    multi_alone = api.predict(images, multi, device="cpu", workers=0).predictions
    assert [[n for n, _ in p.top] for p in own.predictions if p.task == alone[multi].tasks[0]] == [
        [n for n, _ in p.top] for p in multi_alone]


def test_export_metadata_says_multi_label_and_carries_thresholds(trained):
    multi, single = str(trained["multi"].task_path), str(trained["single"].task_path)
    server = load_tasks([multi, single], device="cpu")
    bundle = export_metadata(server.names, server.infos, server.backbone)
    assert json.loads(bundle["multi_label"]) == [True, False]
    assert json.loads(bundle["thresholds"]) == [server.infos[0].thresholds, None]
    alone = export_metadata(server.names[:1], server.infos[:1], server.backbone)
    assert json.loads(alone["multi_label"]) is True and json.loads(alone["thresholds"]) == server.infos[0].thresholds


def test_an_exported_multi_label_task_carries_its_thresholds(trained, tmp_path):
    task = load_task(trained["multi"].task_path)
    api.export(str(task.path), "torchscript", tmp_path / "colours.pt")
    extra = {"multi_label.txt": "", "thresholds.txt": "", "classes.txt": ""}
    torch.jit.load(str(tmp_path / "colours.pt"), _extra_files=extra)
    assert json.loads(extra["multi_label.txt"]) is True
    assert json.loads(extra["thresholds.txt"]) == task.info.thresholds
    assert json.loads(extra["classes.txt"]) == task.info.classes
