"""--shots K: K training images per class, seeded and stratified, and the task records which files."""
from __future__ import annotations

from pathlib import Path

from test_readers import make_csv, run_config
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.artifact.schema import read_task_info
from vpt_cli.cli.app import app
from vpt_cli.data import Sample, class_counts, few_shot


def samples(counts: list[int]) -> list[Sample]:
    return [Sample(Path(f"{label}/{i}.png"), label) for label, count in enumerate(counts) for i in range(count)]


def test_few_shot_keeps_k_per_class_seeded_and_in_order():
    pool = samples([10, 3, 7])
    kept = few_shot(pool, 4, seed=0)
    assert class_counts(kept, 3) == [4, 3, 4]  # a class with fewer keeps all it has
    assert kept == [s for s in pool if s in kept]  # original order
    assert few_shot(pool, 4, seed=0) == kept
    assert any(few_shot(pool, 4, seed=s) != kept for s in range(1, 5))
    # adding a class does not change which files the others keep
    assert [s for s in few_shot(samples([10, 3, 7, 5]), 4, seed=0) if s.label < 3] == kept


def test_train_with_shots_records_the_files_used(tiny_weights, tmp_path):
    data = make_csv(tmp_path / "data")
    result = api.train(run_config(tiny_weights, data, shots=2), task="two-shot")
    assert result.num_train == 6
    provenance = read_task_info(result.task_path).provenance
    assert provenance["shots"]["k"] == 2 and len(provenance["shots"]["files"]) == 6
    assert all(f.startswith("img/") and (data.parent / f).is_file() for f in provenance["shots"]["files"])
    assert provenance["class_counts"] == [2, 2, 2]


def test_bad_shots_is_a_usage_error(tmp_path):
    done = CliRunner().invoke(app, ["train", str(tmp_path), "--shots", "0"])
    assert done.exit_code == 2 and "--shots must be at least 1" in done.stderr
