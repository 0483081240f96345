"""A refused train prints its one error line and leaves nothing behind (no run folder, lock or
temp file); args.yaml is what ran and reproduces the run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_KWARGS
from test_cli import SAMPLE, tiny_flags
from typer.testing import CliRunner

from vpt_cli.artifact.schema import load_task
from vpt_cli.cli.app import app


def _train(*args: object):
    return CliRunner().invoke(app, ["train", *(str(a) for a in args)])


def _nothing_left(home: Path) -> None:
    assert not Path("runs").exists()
    leftovers = [p for p in home.rglob("*")] if home.exists() else []
    assert not [p for p in leftovers if p.is_file()], leftovers


def _broken_images(tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(3):
            (root / label / f"{index}.png").write_bytes(b"not a png")
    return root


def _wrong_width(tmp_path: Path, weights: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state["cls_token"] = torch.zeros(1, 1, 32)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    return path


# (what is refused, extra arguments given a tmp folder and the tiny weights, exit code, words of the line)
REFUSALS = [
    ("a CNN, by its timm name", lambda tmp, w: ["--backbone", "convnext_tiny", "--img-size", "224"], 4,
     "not a Vision Transformer of a supported family"),
    ("a hybrid, by its timm name", lambda tmp, w: ["--backbone", "vit_base_r50_s16_384"], 4, "supported: beit"),
    ("an unknown timm model", lambda tmp, w: ["--backbone", "vit_nonexistent"], 4, "unknown timm model"),
    ("an option out of range", lambda tmp, w: [*tiny_flags(w), "--tau", "99"], 2, "--tau"),
    ("a data format that does not fit", lambda tmp, w: [*tiny_flags(w), "--data-format", "vtab"], 3, ""),
    ("a bad task name", lambda tmp, w: [*tiny_flags(w), "--task", "a/b"], 2, "task"),
    ("a missing weights file", lambda tmp, w: ["--backbone-weights", tmp / "none.safetensors"], 4, "not found"),
    ("a weights file of no known type", lambda tmp, w: ["--backbone-weights", SAMPLE / "LICENSE.md"], 4,
     "unsupported weights file type"),
    ("weights that do not fit (found once the backbone is built)",
     lambda tmp, w: [*tiny_flags(_wrong_width(tmp, w))], 4, "do not fit"),
]


@pytest.mark.parametrize("what, extra, code, words", REFUSALS, ids=[row[0] for row in REFUSALS])
def test_a_refused_train_says_one_line_and_leaves_nothing(what, extra, code, words, tiny_weights, tmp_path,
                                                          isolated_home):
    result = _train(SAMPLE, *extra(tmp_path, tiny_weights), "--epochs", "1", "--workers", "0")
    assert result.exit_code == code, result.output
    assert result.stdout == ""  # nothing printed before the refusal: no 'run folder' line
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.output
    _nothing_left(isolated_home)


def test_data_with_no_readable_image_leaves_no_run_folder(tiny_weights, tmp_path, isolated_home):
    result = _train(_broken_images(tmp_path), *tiny_flags(tiny_weights), "--epochs", "1", "--workers", "0")
    assert result.exit_code == 3 and "no readable training images" in result.stderr
    assert "run folder" not in result.output
    _nothing_left(isolated_home)


def test_args_yaml_is_what_ran_and_reproduces_the_run(tiny_weights):
    flags = [*tiny_flags(tiny_weights), "--epochs", "2", "--workers", "0", "--batch-size", "16", "--shots", "6"]
    first = _train(SAMPLE, "--task", "first", *flags)
    assert first.exit_code == 0, first.output
    args_path = Path("runs/train/first/args.yaml")
    args = yaml.safe_load(args_path.read_text())
    assert [f"{s}.{k}" for s, values in args.items() for k, v in values.items() if v is None] == []
    assert args["backbone"]["kwargs"] == TINY_KWARGS and args["data"]["shots"] == 6
    again = _train(SAMPLE, "--task", "again", "--config", args_path)
    assert again.exit_code == 0, again.output
    one, two = load_task(_task_path("first")), load_task(_task_path("again"))
    assert set(one.tensors) == set(two.tensors)
    for name, tensor in one.tensors.items():
        assert torch.equal(tensor, two.tensors[name]), name
    assert yaml.safe_load(Path("runs/train/again/args.yaml").read_text()) == args  # resolving it changes nothing


def _task_path(name: str) -> Path:
    from vpt_cli.artifact.home import resolve_task_path

    return resolve_task_path(name)
