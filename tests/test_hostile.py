"""Hostile input, generated on the fly: task files, weight files, images, names and paths.

Every case must end with its documented exit code, one line on stderr, no traceback, and no file
written outside the folders the user asked for (README, "Exit codes").
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from vpt_cli.artifact.home import resolve_task_path, task_lock
from vpt_cli.artifact.schema import METADATA_KEY, Task, TaskInfo, save_task
from vpt_cli.cli.app import app
from vpt_cli.config import PromptConfig
from vpt_cli.models.prompted import PromptedViT

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
IMAGE = sorted((SAMPLE / "val" / "bag").iterdir())[0]
runner = CliRunner()


def run(*args) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_clean_failure(code: int, stderr: str, expected_code: int, pattern: str = "") -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == expected_code, stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr and pattern in stderr, stderr


@pytest.fixture
def good_task(tiny_backbone, tiny_weights) -> tuple[dict, dict]:
    """(metadata, tensors) of a valid deep task on the tiny backbone, to be broken by each case."""
    torch.manual_seed(0)
    model = PromptedViT(tiny_backbone.model, 2, PromptConfig("vpt-deep", 2))
    info = TaskInfo(name="good", backbone=tiny_backbone.name, backbone_fingerprint=tiny_backbone.fingerprint,
                    img_size=32, data_config=json.loads(json.dumps(tiny_backbone.data_config, default=list)),
                    prompt=asdict(PromptConfig("vpt-deep", 2)), classes=["bag", "dress"],
                    backbone_kwargs=tiny_config().kwargs, backbone_weights=str(tiny_weights))
    return asdict(info), {k: v.clone() for k, v in model.task_state_dict().items()}


def write_raw(path: Path, metadata: object, tensors: dict) -> Path:
    """A task file as an attacker writes it: any metadata, any tensors, no validation."""
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: text})
    return path


def mutate(metadata: dict, key: str, value) -> dict:
    changed = json.loads(json.dumps(metadata))
    section, _, field = key.partition(".")
    if field:
        changed[section][field] = value
    else:
        changed[key] = value
    return changed


BAD_METADATA = {
    "absolute name": ("name", "/tmp/escaped-by-name"),
    "dotdot name": ("name", "../../../../tmp/escaped"),
    "depth bomb": ("backbone_kwargs.depth", 4000),
    "width bomb": ("backbone_kwargs.embed_dim", 4096),
    "unknown kwarg": ("backbone_kwargs.pretrained_cfg_overlay", {"file": "/etc/passwd"}),
    "huge image": ("img_size", 100_000),
    "ansi class": ("classes", ["bag", "\x1b[31mdress"]),
    "duplicate classes": ("classes", ["bag", "bag"]),
    "empty classes": ("classes", []),
    "number class": ("classes", ["bag", 7]),
    "zero std": ("data_config.std", [0.0, 0.5, 0.5]),
    "odd interpolation": ("data_config.interpolation", "exec"),
    "unknown method": ("prompt.method", "lora"),
    "negative prompts": ("prompt.num_prompts", -3),
    "unknown prompt key": ("prompt.evil", "x"),
    "newer format": ("format_version", 99),
    "fingerprint not hex": ("backbone_fingerprint", "zz"),
    "backbone path": ("backbone", "../../weights"),
    "metrics nan": ("metrics", {"val_top1": "NaN"}),
}


@pytest.mark.parametrize("key, value", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_bad_metadata_is_refused_in_one_line(good_task, tmp_path, key, value):
    metadata, tensors = good_task
    path = write_raw(tmp_path / "hostile.safetensors", mutate(metadata, key, value), tensors)
    code, stdout, stderr = run("predict", IMAGE, "--task", path)
    assert_clean_failure(code, stderr, 5, "hostile.safetensors")
    assert not Path("/tmp/escaped-by-name").exists() and not (tmp_path.parent / "escaped").exists()


def bad_tensors(tensors: dict) -> dict[str, dict]:
    head = tensors["head.weight"]
    return {
        "nan prompts": {**tensors, "prompts": torch.full_like(tensors["prompts"], float("nan"))},
        "inf head": {**tensors, "head.bias": torch.tensor([float("inf"), 0.0])},
        "head rows != classes": {**tensors, "head.weight": head[:1], "head.bias": tensors["head.bias"][:1]},
        "wrong width": {**tensors, "prompts": torch.zeros(2, 2, 48)},
        "wrong depth": {**tensors, "prompts": torch.zeros(5, 2, 64)},
        "wrong prompt count": {**tensors, "prompts": torch.zeros(2, 7, 64)},
        "int tensor": {**tensors, "head.bias": torch.zeros(2, dtype=torch.int64)},
        "extra tensor": {**tensors, "backbone.blocks.0.attn.qkv.weight": torch.zeros(192, 64)},
        "missing head": {k: v for k, v in tensors.items() if not k.startswith("head.")},
    }


@pytest.mark.parametrize("case", list(bad_tensors({"prompts": torch.zeros(1), "head.weight": torch.zeros(2, 1),
                                                   "head.bias": torch.zeros(2)})))
def test_bad_tensors_are_refused_in_one_line(good_task, tmp_path, case):
    metadata, tensors = good_task
    path = write_raw(tmp_path / "hostile.safetensors", metadata, bad_tensors(tensors)[case])
    code, _, stderr = run("predict", IMAGE, "--task", path)
    assert_clean_failure(code, stderr, 5, "hostile.safetensors")


BAD_FILES = {
    "empty": b"",
    "short": b"\x01\x02",
    "huge header length": (2**62).to_bytes(8, "little") + b"{}",
    "header not json": (5).to_bytes(8, "little") + b"{oops",
    "header a list": (2).to_bytes(8, "little") + b"[]",
    "metadata not json": None,  # built below
    "truncated tensors": None,
}


@pytest.mark.parametrize("case", BAD_FILES, ids=BAD_FILES.keys())
def test_corrupt_files_are_refused_in_one_line(good_task, tmp_path, case):
    metadata, tensors = good_task
    path = tmp_path / "hostile.safetensors"
    if case == "metadata not json":
        write_raw(path, "{not json", tensors)
    elif case == "truncated tensors":
        data = write_raw(path, metadata, tensors).read_bytes()
        path.write_bytes(data[:-40])
    else:
        path.write_bytes(BAD_FILES[case])
    code, _, stderr = run("predict", IMAGE, "--task", path)
    assert_clean_failure(code, stderr, 5)


def test_markup_in_class_names_and_paths_is_printed_as_text(good_task, tmp_path):
    metadata, tensors = good_task
    path = write_raw(tmp_path / "markup.safetensors", mutate(metadata, "classes", ["[/]", "[bold]x[/bold]"]), tensors)
    code, stdout, stderr = run("predict", IMAGE, "--task", path, "--top-k", "2")
    assert code == 0, stderr
    assert "[/]" in stdout and "[bold]x[/bold]" in stdout
    code, _, stderr = run("predict", tmp_path / "scan[/b].png", "--task", path)
    assert_clean_failure(code, stderr, 7, "scan[/b].png")


def test_predict_json_is_strict(good_task, tmp_path):
    metadata, tensors = good_task
    path = write_raw(tmp_path / "ok.safetensors", metadata, tensors)
    code, stdout, _ = run("predict", IMAGE, "--task", path, "--format", "json")
    assert code == 0

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    assert json.loads(stdout, parse_constant=no_constants)["predictions"]


def test_vpt_tasks_lists_bad_files_and_goes_on(good_task, isolated_home):
    metadata, tensors = good_task
    registry = isolated_home / "tasks"
    registry.mkdir(parents=True)
    write_raw(registry / "good.safetensors", metadata, tensors)
    for index, (key, value) in enumerate(BAD_METADATA.values()):
        write_raw(registry / f"bad{index:02d}.safetensors", mutate(metadata, key, value), tensors)
    (registry / "junk.safetensors").write_bytes(b"junk")
    code, stdout, stderr = run("tasks", "--json")
    assert code == 0, stderr
    listed = json.loads(stdout)
    assert len(listed) == len(BAD_METADATA) + 2
    assert [row["name"] for row in listed if "error" not in row] == ["good"]
    code, stdout, _ = run("tasks")
    assert code == 0 and "unusable" in stdout


WEIGHT_CASES = ["empty pth", "random safetensors", "wrong width", "nan weights", "pickle payload", "folder"]


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_bad_backbone_weights_exit_4_in_one_line(tiny_backbone, tmp_path, case):
    marker = tmp_path / "payload-ran"
    if case == "empty pth":
        weights = tmp_path / "w.pth"
        weights.write_bytes(b"")
    elif case == "random safetensors":
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(os.urandom(256))
    elif case in ("wrong width", "nan weights"):
        state = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
        if case == "wrong width":
            state["pos_embed"] = torch.zeros(1, 17, 48)
        else:
            state["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
        weights = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    elif case == "pickle payload":
        class Payload:
            def __reduce__(self):
                return (Path.touch, (marker,))

        weights = tmp_path / "w.pth"
        weights.write_bytes(pickle.dumps({"state_dict": Payload()}))
    else:
        weights = tmp_path / "folder.safetensors"
        weights.mkdir()
    flags = ["--backbone", "vit_tiny_patch16_224", "--backbone-weights", weights, "--img-size", "32",
             *[item for key, value in tiny_config().kwargs.items() for item in ("--backbone-arg", f"{key}={value}")]]
    code, _, stderr = run("train", SAMPLE, "--task", "w", *flags, "--epochs", "1", "-q")
    assert_clean_failure(code, stderr, 4)
    assert not marker.exists()


BAD_NAMES = ["a/b", ".safetensors", "", "..", "dir/.safetensors", "bad name!", "-dash", "x" * 65]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_task_names_exit_2_before_any_work(tiny_weights, name, isolated_home):
    code, _, stderr = run("train", SAMPLE, "--task", name, "--backbone-weights", tiny_weights, "-q")
    assert_clean_failure(code, stderr, 2)
    assert not (isolated_home / "runs").exists()


def test_default_task_name_is_slugified(tmp_path, tiny_weights):
    from vpt_cli.artifact.home import slugify

    assert slugify("My Photos (2024)!") == "My-Photos-2024"
    assert slugify("...") == "task" and slugify("日本") == "task"
    assert len(slugify("x" * 200)) == 64


def test_a_second_train_of_the_same_task_fails_at_once(good_task, tiny_weights, isolated_home):
    path = resolve_task_path("busy")
    with task_lock(path):
        code, _, stderr = run("train", SAMPLE, "--task", "busy", "--backbone-weights", tiny_weights, "-q")
    assert_clean_failure(code, stderr, 5, f"being trained by pid {os.getpid()}")
    stale = next((isolated_home / "locks").iterdir(), None)
    assert stale is None  # released when the holder finished
    locks = isolated_home / "locks"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (locks / f"busy.safetensors.{'0' * 16}.lock").write_text(json.dumps(
        {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}))
    with task_lock(path):  # a lock whose process is gone does not block (other key, same rule)
        pass


def test_output_dir_that_cannot_be_written_exits_2(good_task, tmp_path):
    metadata, tensors = good_task
    path = write_raw(tmp_path / "ok.safetensors", metadata, tensors)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, stderr = run("eval", SAMPLE / "val", "--task", path, "--output-dir", blocker / "sub")
    assert_clean_failure(code, stderr, 2, "cannot write")


def test_symlink_loops_end_and_thin_images_are_skipped(good_task, tmp_path):
    metadata, tensors = good_task
    task = write_raw(tmp_path / "ok.safetensors", metadata, tensors)
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    Image.open(IMAGE).save(photos / "a" / "good.png")
    Image.new("L", (1, 20000)).save(photos / "a" / "thin.png")
    (photos / "a" / "loop").symlink_to(photos, target_is_directory=True)
    code, stdout, stderr = run("predict", f"{photos}/**/*.png", "--task", task, "--format", "csv")
    assert code == 0, stderr
    rows = stdout.strip().splitlines()[1:]
    assert {row.split(",")[0] for row in rows} == {str(photos / "a" / "good.png")}
    assert "too thin" in stderr


# One fresh process runs the cases in turn and prints each exit code with its peak memory so far:
# one interpreter's imports (7 s) instead of one per case, and each case's peak is within the
# printed one.
_BOMB_DRIVER = """
import json, resource, sys
from typer.testing import CliRunner
from vpt_cli.cli.app import app
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    print(json.dumps([result.exit_code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      result.stderr[-2000:]]), flush=True)
"""


@pytest.mark.heavy
def test_bombs_stay_within_bounded_memory(good_task, tmp_path):
    """A depth-4000 task and a 1 x 20000 image, in a fresh process: refused, small peak memory."""
    metadata, tensors = good_task
    task = write_raw(tmp_path / "bomb.safetensors", mutate(metadata, "backbone_kwargs.depth", 4000), tensors)
    thin = tmp_path / "thin.png"
    Image.new("L", (1, 20000)).save(thin)
    good = write_raw(tmp_path / "good.safetensors", metadata, tensors)
    cases = [(["predict", str(IMAGE), "--task", str(task)], 5), (["predict", str(thin), "--task", str(good)], 7)]
    result = subprocess.run([sys.executable, "-c", _BOMB_DRIVER, json.dumps([args for args, _ in cases])],
                            capture_output=True, text=True, timeout=300)
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == len(cases), result.stderr[-3000:]
    for (code, peak_mb, stderr), (_, expected) in zip(reports, cases):
        assert code == expected, stderr
        assert peak_mb < 1500, f"{peak_mb:.0f} MB"


def test_task_files_get_the_umask_mode_and_leave_no_temp_files(good_task, tmp_path):
    metadata, tensors = good_task
    old = os.umask(0o022)
    try:
        path = save_task(Task(TaskInfo(**metadata), tensors), tmp_path / "out" / "mode.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["mode.safetensors"]
