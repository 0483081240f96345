"""The reader registry: csv, VTAB lists and FGVC JSON read into the same splits as folders, train,
evaluate and sweep end to end, and bad rows are skipped with reasons, never fatal."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import tiny_config
from PIL import Image
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.cli.app import app
from vpt_cli.config import PromptConfig, RunConfig, TrainConfig
from vpt_cli.core.errors import DataError, UsageError
from vpt_cli.data import discover_splits, read_eval_split

COLORS = {"ant": (200, 30, 30), "bee": (30, 200, 30), "cat": (30, 30, 200)}


def write_images(root: Path, per_class: int = 6) -> dict[str, list[str]]:
    """root/img/<class>_<i>.png, a little noise on each class's colour -> {class: [relative paths]}."""
    rng = random.Random(0)
    names: dict[str, list[str]] = {}
    for name, color in COLORS.items():
        for i in range(per_class):
            relative = f"img/{name}_{i}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            pixels = [tuple(min(255, c + rng.randrange(20)) for c in color) for _ in range(64)]
            image = Image.new("RGB", (8, 8))
            image.putdata(pixels)
            image.save(root / relative)
            names.setdefault(name, []).append(relative)
    return names


def split_of(i: int) -> str:
    return {4: "val", 5: "test"}.get(i, "train")


def make_csv(root: Path) -> Path:
    files = write_images(root)
    rows = ["path,label,split"] + [f"{path},{name},{split_of(i)}" for name, paths in files.items()
                                   for i, path in enumerate(paths)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def make_vtab(root: Path) -> Path:
    files = write_images(root)
    lists = {"train800.txt": [], "val200.txt": [], "train800val200.txt": [], "test.txt": []}
    for index, paths in enumerate(files.values()):
        for i, path in enumerate(paths):
            split = split_of(i)
            target = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}[split]
            lists[target].append(f"{path} {index}")
            if split != "test":
                lists["train800val200.txt"].append(f"{path} {index}")
    for name, lines in lists.items():
        (root / name).write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(COLORS) + "\n")
    return root


def make_fgvc(root: Path) -> Path:
    files = write_images(root / "images")  # FGVC paths may be relative to images/
    splits: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for index, paths in enumerate(files.values()):
        for i, path in enumerate(paths):
            splits[split_of(i)][path] = index + 1  # ids need not start at 0
    for split, mapping in splits.items():
        (root / f"{split}.json").write_text(json.dumps(mapping))
    return root


MAKERS = {"csv": make_csv, "vtab": make_vtab, "fgvc": make_fgvc}


@pytest.mark.parametrize("fmt", MAKERS)
def test_every_reader_gives_the_same_splits(tmp_path, fmt):
    data = MAKERS[fmt](tmp_path)
    splits = discover_splits(data)
    expected = ["ant", "bee", "cat"] if fmt != "fgvc" else ["1", "2", "3"]
    assert splits.classes == expected and not splits.skipped
    assert len(splits.train) == 12 and len(splits.val) == 3
    assert all(s.path.is_file() and s.path.name.startswith(list(COLORS)[s.label]) for s in splits.train + splits.val)
    assert splits.source.startswith(fmt)
    trainval = discover_splits(data, trainval=True)
    assert len(trainval.train) == 15 and len(trainval.val) == 3  # retrain on train+val, score on test
    assert {s.path.name for s in trainval.val} == {f"{name}_5.png" for name in COLORS}


def run_config(weights: Path, data: Path, **data_options) -> RunConfig:
    config = RunConfig(backbone=tiny_config(weights=str(weights)), train=TrainConfig(epochs=1, batch_size=8))
    config.prompt = PromptConfig(method="vpt-deep", num_prompts=1)
    config.data.path, config.data.workers = str(data), 0
    for key, value in data_options.items():
        setattr(config.data, key, value)
    return config


@pytest.mark.parametrize("fmt", MAKERS)
def test_every_reader_trains_evaluates_and_sweeps(tiny_weights, tmp_path, fmt):
    data = MAKERS[fmt](tmp_path / "data")
    result = api.train(run_config(tiny_weights, data, format=fmt), task=f"t-{fmt}")
    assert result.num_train == 12 and result.num_val == 3
    evaluated = api.evaluate(data, result.task_path, output_dir=tmp_path / "eval", split="test")
    assert evaluated.report.num_samples == 3 and not evaluated.unknown_classes
    swept = api.sweep(run_config(tiny_weights, data), [1e-3, 1e-2], [0.0], [1], task=f"s-{fmt}")
    assert swept.train.num_val == 3


def test_cli_eval_takes_a_split_and_a_forced_format(tiny_weights, tmp_path):
    data = make_csv(tmp_path / "data")
    trained = api.train(run_config(tiny_weights, data, trainval=True), task="csv-tv")
    assert trained.num_train == 15 and trained.val_report is None and trained.test_report.num_samples == 3
    assert trained.selection == "last"  # nothing is selected on the test split
    runner = CliRunner()
    done = runner.invoke(app, ["eval", str(data), "--task", "csv-tv", "--split", "val", "--data-format", "csv",
                               "--json", "--output-dir", str(tmp_path / "e")])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["num_samples"] == 3
    wrong = runner.invoke(app, ["eval", str(data.parent), "--task", "csv-tv", "--data-format", "vtab"])
    assert wrong.exit_code == 3 and "--data-format vtab needs" in wrong.stderr


def test_bad_rows_are_skipped_with_reasons_and_paths_stay_inside(tmp_path):
    data = make_csv(tmp_path / "data")
    (tmp_path / "outside.png").write_bytes((tmp_path / "data" / "img" / "ant_0.png").read_bytes())
    with data.open("a") as handle:
        handle.write("../outside.png,ant,train\n/etc/passwd,ant,train\nimg/missing.png,bee,train\nimg/ant_0.png,,train\n")
    splits = discover_splits(data)
    reasons = [reason for _, reason in splits.skipped]
    assert len(reasons) == 4 and len(splits.train) == 12
    assert any("leads out of the list's folder" in r for r in reasons) and any("absolute path" in r for r in reasons)
    assert any("no such file" in r for r in reasons) and any("no label" in r for r in reasons)
    assert all(r.startswith("labels.csv line ") for r in reasons)


@pytest.mark.parametrize("content, message", [
    ("path,label,split\nimg/ant_0.png,ant,holdout\n", "unknown split 'holdout'"),
    ("file,class\nimg/ant_0.png,ant\n", "missing: path, label"),
])
def test_csv_errors_name_what_is_wrong(tmp_path, content, message):
    write_images(tmp_path)
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        discover_splits(tmp_path / "bad.csv")


def test_vtab_unknown_label_and_missing_train_list_are_named(tmp_path):
    data = make_vtab(tmp_path)
    (data / "val200.txt").write_text("img/ant_0.png 7\n")
    with pytest.raises(DataError, match="unknown label 7"):
        discover_splits(data)
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "classes.txt"):
        (data / name).unlink()
    with pytest.raises(DataError, match="no train800.txt"):
        discover_splits(data)


def test_vtab_without_classes_txt_names_classes_by_index_and_skips_bad_lines(tmp_path):
    data = make_vtab(tmp_path)
    (data / "classes.txt").unlink()
    with (data / "train800.txt").open("a") as handle:
        handle.write("just-a-path\nimg/ant_1.png notanumber\n")
    splits = discover_splits(data)
    assert splits.classes == ["0", "1", "2"] and len(splits.skipped) == 2


def test_fgvc_bad_json_and_bad_ids(tmp_path):
    data = make_fgvc(tmp_path)
    (data / "train.json").write_text(json.dumps({"img/ant_0.png": "x", "img/ant_1.png": 1, "img/bee_0.png": 2}))
    splits = discover_splits(data, val_split=0.0)
    assert len(splits.train) == 2 and "not a whole number" in splits.skipped[0][1]
    (data / "train.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        discover_splits(data)


def test_folders_refuse_trainval_and_eval_reads_a_split_folder(tmp_path):
    for split in ("train", "test"):
        for name in COLORS:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), COLORS[name]).save(tmp_path / split / name / "0.png")
    with pytest.raises(UsageError, match="--trainval"):
        discover_splits(tmp_path, trainval=True)
    samples, _, unknown = read_eval_split(tmp_path, ["ant", "bee"], split="test")
    assert len(samples) == 2 and unknown == ["cat"]
    with pytest.raises(DataError, match="no 'val' folder"):
        read_eval_split(tmp_path, ["ant"], split="val")
