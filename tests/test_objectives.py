"""The objective seam: a task type is one object that the loop, probe, evaluation and serving
call, and the task file names it (older files load as single-label)."""
from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F
from test_artifact import make_task

from vpt_cli.artifact.schema import load_task, read_task_info, save_task
from vpt_cli.core.errors import TaskError
from vpt_cli.objectives import Objective, objective_class, objective_names
from vpt_cli.objectives.balance import ClassBalance
from vpt_cli.objectives.single_label import SingleLabel


def test_single_label_is_registered_and_is_the_default():
    assert objective_names()[0] == "single-label"
    assert objective_class("single-label") is SingleLabel
    with pytest.raises(TaskError, match="single-label"):
        objective_class("regression")
    assert make_task().info.objective == "single-label"


@pytest.mark.parametrize("mode", ["none", "reweight", "resample", "logit-adjust"])
def test_single_label_losses_are_its_class_balance(mode):
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 3), torch.tensor([0] * 8 + [1] * 3 + [2])
    balance = ClassBalance(mode, (8, 3, 1), tau=1.0)
    objective = SingleLabel(balance)
    assert torch.equal(objective.loss(logits, labels), balance.loss(logits, labels))
    assert torch.equal(objective.probe_loss(logits, labels), balance.probe_loss(logits, labels))
    assert objective.batch_weight(labels) == balance.batch_weight(labels)
    # the val loss is plain cross-entropy whatever the balance
    assert objective.eval_loss_sum(logits, labels) == pytest.approx(F.cross_entropy(logits, labels, reduction="sum").item())


def test_probe_score_is_accuracy_or_balanced_accuracy():
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0.0]] * 4)  # always class 0: 3/4 right, class 1 never
    assert SingleLabel().probe_score(logits, labels) == pytest.approx(0.75)
    assert SingleLabel(ClassBalance("reweight", (3, 1))).probe_score(logits, labels) == pytest.approx(0.5)


def test_answers_are_the_top_k_of_the_task_own_classes():
    objective = SingleLabel()
    logits = torch.tensor([0.0, 2.0, 1.0, float("-inf")])  # a padded row: the task has 3 classes
    answer = objective.answer(logits, ["a", "b", "c"], k=5)
    assert [name for name, _ in answer] == ["b", "c", "a"]
    assert sum(score for _, score in answer) == pytest.approx(1.0)
    assert objective.answer(logits, ["a", "b", "c"], k=1)[0][0] == "b"


def test_the_base_class_is_an_interface():
    with pytest.raises(NotImplementedError):
        Objective().scores(torch.zeros(1, 2))


def test_the_task_file_names_its_objective_and_old_files_are_single_label(tmp_path):
    task = make_task()
    path = save_task(task, tmp_path / "t.safetensors")
    assert read_task_info(path).objective == "single-label"
    # a file written before the field existed: same content without "objective"
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    meta = json.loads(header["__metadata__"]["vpt_task"])
    meta.pop("objective")
    old = _rewrite(raw, header, meta)
    (tmp_path / "old.safetensors").write_bytes(old)
    assert load_task(tmp_path / "old.safetensors").info.new_objective() == SingleLabel()
    for hostile in ("regression", "", None, 3, "x" * 10_000):
        meta["objective"] = hostile
        (tmp_path / "bad.safetensors").write_bytes(_rewrite(raw, header, meta))
        with pytest.raises(TaskError, match="objective"):
            read_task_info(tmp_path / "bad.safetensors")


def _rewrite(raw: bytes, header: dict, meta: dict) -> bytes:
    """The same tensors under new task metadata."""
    size = struct.unpack("<Q", raw[:8])[0]
    header = dict(header, __metadata__={**header["__metadata__"], "vpt_task": json.dumps(meta)})
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + size:]
