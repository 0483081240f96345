"""Data-parallel runs: sharding arithmetic, the --devices launcher, and a 2-process gloo run that
must equal the 1-process run with the same global batch."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from conftest import TINY_KWARGS, tiny_config
from torch.utils.data import BatchSampler, SequentialSampler
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.artifact.schema import load_task
from vpt_cli.cli.app import app
from vpt_cli.cli.launch import parse_devices, root_cause, without_devices
from vpt_cli.config import RunConfig, TrainConfig
from vpt_cli.runtime.sharding import ShardedBatchSampler, shard_bounds

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
    assert parse_devices("3,") == (1, "3")
    assert without_devices(["train", "d", "--devices", "0,1", "--epochs", "2", "--devices=3"]) == [
        "train", "d", "--epochs", "2"]


def test_the_job_blames_the_killed_process_not_the_ones_that_failed_or_stopped_after_it():
    failed = lambda code, at: SimpleNamespace(exitcode=code, timestamp=at)  # noqa: E731
    killed = {0: failed(1, 10), 1: failed(-9, 11), 2: failed(-15, 11)}  # 0 lost its peer before the agent saw 1 die
    assert root_cause(killed)[0] == 1
    crashed = {0: failed(143, 12), 1: failed(1, 12)}  # 0 was stopped because 1 crashed
    assert root_cause(crashed)[0] == 1
    refused = {0: failed(5, 3), 1: failed(5, 3)}  # every process refused the same task: rank 0 said why
    assert root_cause(refused) == (0, refused[0])


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason="needs a machine with fewer than 64 GPUs")
@pytest.mark.parametrize("spec", ["64", "0,63", "cpu:x", "0"])
def test_devices_beyond_the_machine_or_malformed_are_one_line_usage_errors(spec):
    result = CliRunner().invoke(app, ["train", str(SAMPLE), "--devices", spec])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "--devices" in result.output


def _train_flags(weights: Path, epochs: int = 2) -> list[str]:
    arch = [flag for key, value in TINY_KWARGS.items() for flag in ("--backbone-arg", f"{key}={value}")]
    return ["--backbone", "vit_tiny_patch16_224", "--backbone-weights", str(weights), "--img-size", "32", *arch,
            "--prompts", "2", "--prompt-dropout", "0", "--augment", "none", "--epochs", str(epochs), "--workers", "0",
            "--batch-size", str(GLOBAL_BATCH), "--seed", "3", "--select", "last"]


def _vpt(*args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    # this checkout's vpt_cli, whatever the environment has installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "vpt_cli", *args]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _single_run(weights: Path, epochs: int) -> RunConfig:
    """The 1-process twin of `_train_flags`."""
    config = RunConfig(backbone=tiny_config(weights=str(weights)),
                       train=TrainConfig(epochs=epochs, batch_size=GLOBAL_BATCH, seed=3, select="last"))
    config.prompt.num_prompts, config.prompt.dropout = 2, 0.0
    config.data.path, config.data.augment, config.data.workers = str(SAMPLE), "none", 0
    return config


@contextmanager
def _default_threads() -> Iterator[None]:
    """Run the single-process twin with torch's default thread count (one per core), as a user's
    `vpt train` runs, not with the one thread each test worker and each `--devices cpu:2` process
    has: the two must agree although their float sums are grouped differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _max_difference(task_a: Path, task_b: Path) -> float:
    a, b = load_task(task_a).tensors, load_task(task_b).tensors
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.heavy
def test_two_gloo_processes_train_what_one_process_trains(tiny_weights, tmp_path):
    """`--devices cpu:2` relaunches the command as 2 gloo processes with global batch 25 (shares 13
    and 12); with prompt dropout 0 and no augmentation nothing random differs, so the task equals
    the 1-process task."""
    with _default_threads():
        single = api.train(_single_run(tiny_weights, epochs=2), task="single")

    result = _vpt("train", str(SAMPLE), "--task", "double", *_train_flags(tiny_weights), "--devices", "cpu:2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes: global batch 25, 13 or 12 images per process" in result.stderr
    assert result.stdout.count("task 'double'") <= 1  # rank 0 alone renders
    assert _max_difference(single.task_path, Path(os.environ["VPT_HOME"]) / "tasks" / "double.safetensors") < 1e-4
    assert sorted(p.name for p in (tmp_path / "runs" / "train").iterdir()) == ["double", "single"]


def _shard_worker(rank: int, port: int, home: str, out: str) -> None:
    """One of 2 torchrun-like processes: evaluate and predict with the task `single`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), VPT_HOME=home)
    torch.set_num_threads(1)
    evaluated = api.evaluate(SAMPLE / "val", "single", batch_size=25, device="cpu", workers=0,
                             output_dir=Path(out) / "eval2")
    predicted = api.predict([str(SAMPLE / "val" / "bag")], "single", top_k=3, batch_size=4, device="cpu", workers=0)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"eval": evaluated.to_dict(), "predict": predicted.to_dict()}))


def test_two_gloo_processes_evaluate_and_predict_what_one_process_does(tiny_weights, tmp_path):
    """Each process takes its share (eval: of every batch; predict: a block of the images); every
    image counts once (60 val images, the last batch of 10 split 5 + 5) and both processes return
    the whole answer in the single-process order."""
    config = RunConfig(backbone=tiny_config(weights=str(tiny_weights)), train=TrainConfig(epochs=1))
    config.prompt.num_prompts, config.data.path = 2, str(SAMPLE)
    with _default_threads():
        api.train(config, task="single")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    # forked, not spawned: a spawned process would import torch, timm and this module again (7 s each)
    torch.multiprocessing.start_processes(_shard_worker, args=(port, os.environ["VPT_HOME"], str(tmp_path)), nprocs=2,
                                          start_method="fork")
    with _default_threads():
        alone_eval = api.evaluate(SAMPLE / "val", "single", batch_size=25, workers=0, output_dir=tmp_path / "eval1")
        alone_predict = api.predict([str(SAMPLE / "val" / "bag")], "single", top_k=3, workers=0)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0] == ranks[1]
    shared = ranks[0]["eval"]
    assert shared["num_samples"] == alone_eval.report.num_samples == 60
    assert shared["top1"] == alone_eval.report.top1 and shared["loss"] == pytest.approx(alone_eval.report.loss, abs=1e-5)
    sharded, alone = (list(csv.reader((tmp_path / run / "predictions.csv").open())) for run in ("eval2", "eval1"))
    assert [row[:3] for row in sharded] == [row[:3] for row in alone]  # file, true and predicted class, in order
    assert all(float(a[3]) == pytest.approx(float(b[3]), abs=2e-6) for a, b in zip(sharded[1:], alone[1:]))
    expected = alone_predict.to_dict()["predictions"]
    got = ranks[0]["predict"]["predictions"]
    assert [p["file"] for p in got] == [p["file"] for p in expected]
    assert all(a["class"] == b["class"] and a["prob"] == pytest.approx(b["prob"], abs=1e-5)
               for x, y in zip(got, expected) for a, b in zip(x["top"], y["top"]))


def _launched_rank(launcher: int, rank: int) -> int | None:
    """The pid of the process of `rank` that the --devices launcher `launcher` started."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.heavy
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the processes through /proc")
def test_a_killed_process_ends_the_job_in_one_line_and_resume_continues_it(tiny_weights, tmp_path):
    epochs = 4  # killed once epoch 1 is saved: epochs 2-4 (seconds) are the margin before the job would end
    job = _vpt("train", str(SAMPLE), "--task", "killed", *_train_flags(tiny_weights, epochs), "--devices", "cpu:2",
               wait=False)
    checkpoint = tmp_path / "runs" / "train" / "killed" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = _launched_rank(job.pid, 1)
    assert victim is not None, job.communicate()[1][-2000:]
    os.kill(victim, signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode not in (0, None)
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "process 1 of 2 was killed by SIGKILL" in errors[0] and "--resume" in errors[0], stderr

    resumed = _vpt("train", str(SAMPLE), "--task", "killed", *_train_flags(tiny_weights, epochs), "--devices", "cpu:2",
                   "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stderr
    with _default_threads():
        single = api.train(_single_run(tiny_weights, epochs), task="single")
    assert _max_difference(single.task_path, Path(os.environ["VPT_HOME"]) / "tasks" / "killed.safetensors") < 1e-4
