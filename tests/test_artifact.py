"""Task files: symmetric save/load, atomic writes, no silent overwrite, registry paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vpt_cli.artifact.home import resolve_task_path, tasks_dir
from vpt_cli.artifact.registry import list_tasks
from vpt_cli.artifact.schema import (
    FORMAT_VERSION,
    Task,
    TaskInfo,
    load_task,
    read_safetensors_header,
    read_task_info,
    save_task,
)
from vpt_cli.core.errors import TaskError, UsageError

DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
               "crop_pct": 0.9, "crop_mode": "center"}


def make_task(name="birds"):
    """A small valid task file's content (4-wide prompts, 2 classes)."""
    info = TaskInfo(name=name, backbone="vit_tiny_patch16_224", backbone_fingerprint="0" * 32, img_size=32,
                    data_config=dict(DATA_CONFIG), prompt={"method": "vpt-deep", "num_prompts": 2},
                    classes=["a", "b"])
    return Task(info=info, tensors={"prompts": torch.randn(2, 2, 4), "head.weight": torch.randn(2, 4),
                                    "head.bias": torch.randn(2)})


def test_roundtrip_keeps_tensors_and_metadata(tmp_path):
    task = make_task()
    path = save_task(task, tmp_path / "t.safetensors")
    loaded = load_task(path)
    assert loaded.info == task.info
    assert loaded.info.format_version == FORMAT_VERSION
    assert all(torch.equal(loaded.tensors[k], v) for k, v in task.tensors.items())
    assert read_task_info(path).classes == ["a", "b"]


def test_existing_task_is_not_overwritten_without_force(tmp_path):
    path = save_task(make_task(), tmp_path / "t.safetensors")
    before = path.read_bytes()
    with pytest.raises(TaskError, match="--force"):
        save_task(make_task(), path)
    assert path.read_bytes() == before
    save_task(make_task(), path, force=True)
    assert path.read_bytes() != before


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken(path, data):
        open(path, "wb").write(data[:10])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", broken)
    with pytest.raises(OSError):
        save_task(make_task(), tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_foreign_corrupt_and_newer_files_are_refused(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        load_task(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 20)
    with pytest.raises(TaskError, match="not a readable"):
        load_task(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(TaskError, match="not a vpt task"):
        load_task(foreign)
    newer = tmp_path / "newer.safetensors"
    info = json.dumps({**make_task().info.__dict__, "format_version": FORMAT_VERSION + 1})
    save_file({"w": torch.zeros(2)}, str(newer), metadata={"vpt_task": info})
    with pytest.raises(TaskError, match="upgrade"):
        load_task(newer)


def test_registry_names_and_paths(isolated_home, tmp_path):
    assert resolve_task_path("birds") == isolated_home / "tasks" / "birds.safetensors"
    assert resolve_task_path(str(tmp_path / "x.safetensors")) == tmp_path / "x.safetensors"
    with pytest.raises(UsageError, match="invalid task name"):
        resolve_task_path("bad name!")
    save_task(make_task("birds"), resolve_task_path("birds"))
    save_task(make_task("cars"), resolve_task_path("cars"))
    (tasks_dir() / "broken.safetensors").write_bytes(b"junk")
    entries = list_tasks()
    assert [entry.name for entry in entries] == ["birds", "broken", "cars"]
    assert [entry.info is None for entry in entries] == [False, True, False]
    assert "not a readable task file" in entries[1].error


def test_vpt_tasks_reads_headers_without_importing_torch(isolated_home):
    for name in ("birds", "cars", "dogs"):
        save_task(make_task(name), resolve_task_path(name))
    code = ("import sys; from vpt_cli.cli.app import app\n"
            "try:\n    app(['tasks', '--json'])\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "VPT_HOME": str(isolated_home)})
    assert result.stderr.endswith("NO-TORCH"), result.stderr
    listed = json.loads(result.stdout)
    assert [row["name"] for row in listed] == ["birds", "cars", "dogs"]
    assert listed[0]["classes"] == make_task().info.classes


def test_header_reader_agrees_with_safetensors(tmp_path):
    from safetensors import safe_open

    path = save_task(make_task("birds"), tmp_path / "birds.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        expected = handle.metadata()
    assert read_safetensors_header(path)["__metadata__"] == expected
    for bad in (b"", b"\x08" + b"\x00" * 7 + b"{}", (10**12).to_bytes(8, "little") + b"{}", b"\x02" + b"\x00" * 7 + b"[]"):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        with pytest.raises(TaskError, match="not a readable task file"):
            read_safetensors_header(tmp_path / "bad.safetensors")


def test_vit_b16_deep_task_is_under_one_percent_of_the_backbone(tmp_path):
    from vpt_cli.config import BackboneConfig, PromptConfig
    from vpt_cli.models.backbones import create_backbone
    from vpt_cli.models.prompted import PromptedViT

    backbone = create_backbone(BackboneConfig(name="vit_base_patch16_224"), pretrained=False)
    model = PromptedViT(backbone.model, 200, PromptConfig(method="vpt-deep", num_prompts=10))
    task = Task(info=make_task().info, tensors=model.task_state_dict())
    size = save_task(task, tmp_path / "b16.safetensors").stat().st_size
    backbone_bytes = sum(t.numel() * t.element_size() for t in backbone.model.state_dict().values())
    assert size < 0.01 * backbone_bytes
