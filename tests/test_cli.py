"""End to end through the `vpt` command on sample_data/ with a local tiny backbone file."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import TINY_KWARGS
from PIL import Image
from typer.testing import CliRunner

from vpt_cli.cli.app import app

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
runner = CliRunner()


def tiny_flags(weights: Path) -> list[str]:
    flags = ["--backbone", "vit_tiny_patch16_224", "--backbone-weights", str(weights), "--img-size", "32"]
    for key, value in TINY_KWARGS.items():
        flags += ["--backbone-arg", f"{key}={value}"]
    return flags


def vpt(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_does_not_import_torch():
    code = "import sys; from vpt_cli.cli.app import app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    result = subprocess.run([sys.executable, "-m", "vpt_cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "predict" in result.stdout


def test_help_shows_the_defaults():
    # rich markup would swallow an unescaped "[default: ...]" as a style tag
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Training epochs. [default: 30]" in result.output
    assert "[default: auto, 5% of the patch tokens" in result.output


def test_train_eval_predict_export_on_sample_data(tiny_weights, tmp_path):
    trained = vpt("train", SAMPLE, "--task", "fashion", *tiny_flags(tiny_weights), "--epochs", "2",
                  "--prompts", "2", "--batch-size", "32", "--select", "last", "--json")
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout)
    assert summary["best_epoch"] == 2 and summary["selection"] == "last"
    assert summary["classes"] == ["bag", "dress", "sneaker", "trouser"]
    assert summary["num_train"] == 160 and summary["num_val"] == 60
    assert len(summary["history"]) == 2
    assert summary["task_bytes"] < 0.05 * summary["backbone_bytes"]

    again = vpt("train", SAMPLE, "--task", "fashion", *tiny_flags(tiny_weights), "--epochs", "1")
    assert again.exit_code == 5 and "--force" in again.output

    # eval/predict/export find the backbone file the task was trained with: no extra flags.
    evaluated = vpt("eval", SAMPLE / "val", "--task", "fashion", "--json", "--output-dir", tmp_path / "eval")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["num_samples"] == 60
    assert (tmp_path / "eval" / "confusion.csv").is_file() and (tmp_path / "eval" / "confusion.png").is_file()
    assert abs(metrics["top1"] - summary["val"]["top1"]) < 1e-6

    image = next((SAMPLE / "val" / "bag").iterdir())
    predicted = vpt("predict", image, SAMPLE / "val" / "dress", str(SAMPLE / "val" / "sneaker" / "*.png"),
                    "--task", "fashion", "--top-k", "2", "--format", "json")
    assert predicted.exit_code == 0, predicted.output
    rows = json.loads(predicted.stdout)["predictions"]
    assert len(rows) == 1 + 15 + 15
    assert all(len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"] for r in rows)

    as_csv = vpt("predict", image, "--task", "fashion", "--format", "csv", "-k", "1")
    assert as_csv.stdout.splitlines()[0] == "file,task,rank,class,prob" and len(as_csv.stdout.splitlines()) == 2
    as_json = vpt("predict", image, "--task", "fashion", "--json", "--output", tmp_path / "p.json",
                  "--save-dir", tmp_path / "labelled")
    assert as_json.exit_code == 0 and as_json.stdout == "", as_json.output
    assert json.loads((tmp_path / "p.json").read_text())["predictions"][0]["task"] == "fashion"
    labelled = Image.open(tmp_path / "labelled" / f"{image.stem}.png")
    assert labelled.size[1] > 256 and labelled.getpixel((0, 0)) == (255, 255, 255)  # label band above the image
    again = vpt("predict", image, "--task", "fashion", "--output", tmp_path / "p.json")
    assert again.exit_code == 2 and "--force" in again.stderr

    exported = vpt("export", "--task", "fashion", "--format", "onnx", "--output", tmp_path / "fashion.onnx", "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["max_abs_diff"] < 1e-4

    listed = vpt("tasks", "--json")
    assert [t["name"] for t in json.loads(listed.stdout)] == ["fashion"]


def test_predict_reports_bad_inputs_and_fails_only_if_all_fail(tiny_weights, tmp_path):
    assert vpt("train", SAMPLE, "--task", "t", *tiny_flags(tiny_weights), "--epochs", "1", "-q").exit_code == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    good = next((SAMPLE / "val" / "bag").iterdir())
    mixed = vpt("predict", good, broken, tmp_path / "missing.jpg", "--task", "t", "--format", "json")
    assert mixed.exit_code == 0
    payload = json.loads(mixed.stdout)
    assert len(payload["predictions"]) == 1 and len(payload["failures"]) == 2
    only_bad = vpt("predict", broken, "--task", "t")
    assert only_bad.exit_code == 7 and "Traceback" not in only_bad.output


def test_clear_errors_and_exit_codes(tiny_weights, tmp_path):
    missing = vpt("train", tmp_path / "nowhere", *tiny_flags(tiny_weights))
    assert missing.exit_code == 3 and "Traceback" not in missing.output
    one_class = tmp_path / "one"
    shutil.copytree(SAMPLE / "train" / "bag", one_class / "bag")
    assert vpt("train", one_class, *tiny_flags(tiny_weights)).exit_code == 3
    unknown = vpt("train", SAMPLE, "--backbone", "vit_nope", "--backbone-weights", tiny_weights)
    assert unknown.exit_code == 4 and "unknown timm model" in unknown.output
    bad_value = vpt("train", SAMPLE, *tiny_flags(tiny_weights), "--val-split", "1.5")
    assert bad_value.exit_code == 2
    no_task = vpt("predict", SAMPLE / "val", "--task", "nope")
    assert no_task.exit_code == 5 and "not found" in no_task.output


def test_yaml_config_with_cli_override(tiny_weights, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "backbone:\n  name: vit_tiny_patch16_224\n  img_size: 32\n"
        f"  weights: {tiny_weights}\n  kwargs: {json.dumps(TINY_KWARGS)}\n"
        "prompt:\n  method: vpt-shallow\n  num_prompts: 3\ntrain:\n  epochs: 3\n"
    )
    result = vpt("train", SAMPLE, "--config", config, "--epochs", "1", "--prompt-init", "uniform", "--task", "y", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["history"]) == 1
    from vpt_cli.artifact.home import resolve_task_path
    from vpt_cli.artifact.schema import read_task_info

    info = read_task_info(resolve_task_path("y"))
    assert info.prompt["method"] == "vpt-shallow" and info.prompt["num_prompts"] == 3
    assert info.prompt["init"] == "uniform"
    assert info.provenance["config"]["train"]["epochs"] == 1


def test_linear_summary_and_run_folder_listing_are_true(tiny_weights, tmp_path):
    result = vpt("train", SAMPLE, "--task", "lin", *tiny_flags(tiny_weights), "--method", "linear")
    assert result.exit_code == 0, result.output
    assert "img/s" not in result.stdout and "no epochs" in result.stdout
    listed = result.stdout.split("run folder")[1].split("(")[1].split(")")[0].split(", ")
    run = Path("runs/train/lin")
    assert listed and all((run / name).exists() for name in listed)
    assert not (run / "best.safetensors").exists()  # nothing claims epochs that did not happen


def test_train_run_folder_is_numbered_and_explains_its_lines(tiny_weights):
    first = vpt("train", SAMPLE, "--task", "numbered", *tiny_flags(tiny_weights), "--epochs", "2")
    assert first.exit_code == 0, first.output
    assert "* = the weights kept so far" in first.stderr
    run = Path("runs/train/numbered")
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["args.yaml", "best.safetensors", "checkpoint.safetensors", "last.safetensors", "results.csv",
         "results.png", "skipped.txt"])
    rows = (run / "results.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,lr,train_loss") and len(rows) == 3
    args = yaml.safe_load((run / "args.yaml").read_text())
    unresolved = [f"{section}.{key}" for section, values in args.items() for key, value in values.items()
                  if value is None]
    assert unresolved == []  # what ran: the pooling by name, every image as 'all', the lr the default gave
    assert args["prompt"]["pool"] == "token" and args["data"]["shots"] == "all"
    assert args["train"]["lr"] == 1e-2 and args["prompt"]["num_prompts"] >= 1
    assert args["data"]["path"] == str(SAMPLE) and Path(args["backbone"]["weights"]).is_absolute()
    second = vpt("train", SAMPLE, "--task", "numbered", *tiny_flags(tiny_weights), "--epochs", "1", "--force",
                 "--img-size", "36")
    assert second.exit_code == 0 and Path("runs/train/numbered2/results.csv").is_file()
    assert "not a multiple of the 8 px patch size" in second.stderr
    assert vpt("eval", SAMPLE / "val", "--task", run / "best.safetensors", "-q").exit_code == 0  # a usable task


def test_tensorboard_logs_every_epoch_scalars(tiny_weights):
    from tensorboardX.proto.event_pb2 import Event

    result = vpt("train", SAMPLE, "--task", "tb", *tiny_flags(tiny_weights), "--epochs", "2", "--tensorboard", "-q")
    assert result.exit_code == 0, result.output
    (events,) = Path("runs/train/tb").glob("events.out.tfevents.*")
    data, scalars = events.read_bytes(), {}
    while data:  # TFRecord framing: length (8 bytes), its CRC (4), the record, its CRC (4)
        length = int.from_bytes(data[:8], "little")
        event = Event.FromString(data[12:12 + length])
        data = data[16 + length:]
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert [step for step, _ in scalars["val/acc"]] == [1, 2]
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr"} <= set(scalars)
    rows = (Path("runs/train/tb/results.csv")).read_text().splitlines()[1:]
    assert abs(scalars["train/loss"][1][1] - float(rows[1].split(",")[2])) < 1e-4  # the same numbers as results.csv
