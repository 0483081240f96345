"""Data-parallel runs: sharding arithmetic, the --devices launcher, and a 2-process gloo run that
must equal the 1-process run with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.artifact import load_task
from vpt_cli.cli import app
from vpt_cli.config import RunConfig, TrainConfig
from vpt_cli.launch import parse_devices, without_devices
from vpt_cli.sharding import ShardedBatchSampler, shard_bounds

from conftest import TINY_KWARGS, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
GLOBAL_BATCH = 25  # shares of 13 and 12: the unequal case the loss scaling must get right


@pytest.mark.parametrize("count, world", [(25, 2), (10, 3), (1, 2), (0, 4), (7, 7)])
def test_shards_are_contiguous_cover_everything_once_and_differ_by_at_most_one(count, world):
    bounds = [shard_bounds(count, rank, world) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_each_step_s_shards_union_to_the_single_process_batch():
    batches = BatchSampler(SequentialSampler(range(60)), GLOBAL_BATCH, drop_last=False)
    ranks = [list(ShardedBatchSampler(batches, rank, 2)) for rank in range(2)]
    assert [a + b for a, b in zip(*ranks)] == list(batches)  # the 10-image last batch: 5 + 5, no repeats
    assert len(ShardedBatchSampler(batches, 1, 2)) == len(batches)


def test_devices_specs_and_the_relaunched_command_line():
    assert parse_devices("0,1") == (2, "0,1") and parse_devices("4") == (4, None) and parse_devices("cpu:2") == (2, "cpu")
    assert without_devices(["train", "d", "--devices", "0,1", "--epochs", "2", "--devices=3"]) == [
        "train", "d", "--epochs", "2"]


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason="needs a machine with fewer than 64 GPUs")
@pytest.mark.parametrize("spec", ["64", "0,63", "cpu:x", "0"])
def test_devices_beyond_the_machine_or_malformed_are_one_line_usage_errors(spec):
    result = CliRunner().invoke(app, ["train", str(SAMPLE), "--devices", spec])
    if spec == "0" and torch.cuda.device_count() == 0:
        assert result.exit_code == 2, result.output  # asking for no process
        return
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "--devices" in result.output


def _train_flags(weights: Path) -> list[str]:
    arch = [flag for key, value in TINY_KWARGS.items() for flag in ("--backbone-arg", f"{key}={value}")]
    return ["--backbone", "vit_tiny_patch16_224", "--backbone-weights", str(weights), "--img-size", "32", *arch,
            "--prompts", "2", "--prompt-dropout", "0", "--augment", "none", "--epochs", "2", "--workers", "0",
            "--batch-size", str(GLOBAL_BATCH), "--seed", "3", "--select", "last"]


def _vpt(*args: str) -> subprocess.CompletedProcess:
    # this checkout's vpt_cli, whatever the environment has installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "vpt_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_two_gloo_processes_train_evaluate_and_predict_what_one_process_does(tiny_weights, tmp_path):
    config = RunConfig(backbone=tiny_config(weights=str(tiny_weights)),
                       train=TrainConfig(epochs=2, batch_size=GLOBAL_BATCH, seed=3, select="last"))
    config.prompt.num_prompts, config.prompt.dropout = 2, 0.0
    config.data.path, config.data.augment, config.data.workers = str(SAMPLE), "none", 0
    single = api.train(config, task="single")

    result = _vpt("train", str(SAMPLE), "--task", "double", *_train_flags(tiny_weights), "--devices", "cpu:2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes: global batch 25, 13 or 12 images per process" in result.stderr
    assert result.stdout.count("task 'double'") <= 1  # rank 0 alone renders
    expected = load_task(single.task_path).tensors
    got = load_task(Path(os.environ["VPT_HOME"]) / "tasks" / "double.safetensors").tensors
    assert set(got) == set(expected)
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) < 1e-4
    assert sorted(p.name for p in (tmp_path / "runs" / "train").iterdir()) == ["double", "single"]

    evaluated = _vpt("eval", str(SAMPLE / "val"), "--task", "single", "--json", "--devices", "cpu:2",
                     "--batch-size", "25", "--output-dir", str(tmp_path / "eval2"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    alone = api.evaluate(SAMPLE / "val", "single", batch_size=25, output_dir=tmp_path / "eval1")
    import json

    shared = json.loads(evaluated.stdout)
    assert shared["num_samples"] == alone.report.num_samples == 60  # every image once, none padded
    assert shared["top1"] == alone.report.top1 and shared["loss"] == pytest.approx(alone.report.loss, abs=1e-5)
    assert (tmp_path / "eval2" / "predictions.csv").read_text().splitlines()[0] == "file,true,predicted,confidence"
    assert len((tmp_path / "eval2" / "predictions.csv").read_text().splitlines()) == 61

    predicted = _vpt("predict", str(SAMPLE / "val" / "bag"), "--task", "single", "--format", "csv",
                     "--devices", "cpu:2", "--quiet")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    alone_rows = api.predict([str(SAMPLE / "val" / "bag")], "single", top_k=3)
    rows = predicted.stdout.strip().splitlines()[1:]
    assert [row.split(",")[0] for row in rows[::3]] == [p.file for p in alone_rows.predictions]
