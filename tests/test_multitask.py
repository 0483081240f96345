"""Mixed-task batches: one backbone pass, every answer equal to its task's single-task answer."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from vpt_cli import api
from vpt_cli.artifact.home import tasks_dir
from vpt_cli.artifact.schema import Task, TaskInfo, save_task
from vpt_cli.cli.app import app
from vpt_cli.config import PromptConfig
from vpt_cli.core.errors import TaskError
from vpt_cli.export.exporter import export_model
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.multitask import MultiTaskViT
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.serving.loading import load_for_inference
from vpt_cli.serving.tasks import load_tasks

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
IMAGES = sorted((SAMPLE / "val" / "bag").iterdir())[:3] + sorted((SAMPLE / "val" / "dress").iterdir())[:2]
# Different lengths, deep and shallow, a projection, and a prompt-free linear probe.
MIXED = [PromptConfig("vpt-deep", 3), PromptConfig("vpt-shallow", 5), PromptConfig("vpt-deep", 2, proj_dim=16),
         PromptConfig("linear"), PromptConfig("vpt-deep", 5)]
runner = CliRunner()


def task_models(backbone, configs: list[PromptConfig], seed: int = 1) -> list[PromptedViT]:
    """Eval-mode tasks with random prompts and non-trivial heads of different class counts."""
    torch.manual_seed(seed)
    models = []
    for i, config in enumerate(configs):
        model = PromptedViT(backbone, 2 + i, config).eval()
        torch.nn.init.normal_(model.head.weight, std=0.5)
        torch.nn.init.normal_(model.head.bias, std=0.5)
        models.append(model)
    return models


def check_mixed_equals_single(backbone, configs: list[PromptConfig]) -> None:
    models = task_models(backbone, configs)
    mixed = MultiTaskViT(backbone, models)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # Interleaved: every image with every task, tasks alternating inside the batch.
    task_index = torch.arange(len(models)).repeat(3)
    batch = images.repeat_interleave(len(models), dim=0)
    calls = []
    hook = backbone.blocks[0].register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    with torch.inference_mode():
        logits = mixed(batch, task_index)
    hook.remove()
    assert calls == [len(batch)], "one backbone pass for the whole mixed batch"
    for t, model in enumerate(models):
        with torch.inference_mode():
            expected = model(images)
        got = logits[task_index == t]
        classes = model.head.out_features
        torch.testing.assert_close(got[:, :classes], expected, atol=1e-5, rtol=0)
        assert torch.isneginf(got[:, classes:]).all()


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_mixed_batch_equals_single_task_outputs(pool):
    torch.manual_seed(0)
    # avg: padded prompt slots must not leak into the average; a register token moves the prefix.
    backbone = create_backbone(tiny_config(kwargs=dict(global_pool=pool, reg_tokens=1 if pool == "avg" else 0)),
                               pretrained=False).model
    check_mixed_equals_single(backbone, MIXED)


def test_same_length_mix_needs_no_mask_and_is_identical(tiny_backbone):
    models = task_models(tiny_backbone.model, [PromptConfig("vpt-deep", 4), PromptConfig("vpt-shallow", 4)])
    mixed = MultiTaskViT(tiny_backbone.model, models)
    assert mixed.distinct_lengths == [4]
    check_mixed_equals_single(tiny_backbone.model, [PromptConfig("vpt-deep", 4), PromptConfig("vpt-shallow", 4)])


def test_mixing_refuses_models_on_another_backbone(tiny_backbone):
    other = create_backbone(tiny_config(), pretrained=False).model
    with pytest.raises(ValueError, match="shared backbone"):
        MultiTaskViT(tiny_backbone.model, task_models(tiny_backbone.model, MIXED[:1]) + task_models(other, MIXED[:1]))


# --- task files, the serving API and the CLI ------------------------------------------------------


def save_tasks(backbone, weights: Path, configs: list[PromptConfig], names: list[str], seed: int = 1) -> list[Path]:
    """Task files in the registry, as `vpt train` would write them (random prompts and heads)."""
    paths = []
    for name, model, config in zip(names, task_models(backbone.model, configs, seed), configs):
        info = TaskInfo(name=name, backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
                        img_size=backbone.img_size, data_config=json.loads(json.dumps(backbone.data_config, default=list)),
                        prompt=asdict(config), classes=[f"{name}{c}" for c in range(model.head.out_features)],
                        backbone_kwargs=tiny_config().kwargs, backbone_weights=str(weights))
        paths.append(save_task(Task(info, model.task_state_dict()), tasks_dir() / f"{name}.safetensors"))
    return paths


@pytest.fixture
def registry(tiny_backbone, tiny_weights) -> list[str]:
    names = ["deep3", "shallow5", "proj2"]
    save_tasks(tiny_backbone, tiny_weights, MIXED[:3], names)
    return names


def test_server_predicts_pil_and_tensors_like_single_task_predict(registry):
    server = load_tasks(registry)
    pil = [Image.open(path) for path in IMAGES[:2]]
    answers = server.predict(pil, ["shallow5", "proj2"], top_k=2)
    single = [api.predict([str(IMAGES[0])], "shallow5", top_k=2).predictions[0].top,
              api.predict([str(IMAGES[1])], "proj2", top_k=2).predictions[0].top]
    for got, expected in zip(answers, single):
        assert [c for c, _ in got] == [c for c, _ in expected]
        assert [p for _, p in got] == pytest.approx([p for _, p in expected], abs=1e-5)
    tensors = torch.stack([server.transform(image.convert("RGB")) for image in pil])
    assert server.predict(tensors, "deep3", top_k=9)[0][0][0].startswith("deep3")
    assert len(server.predict(tensors, "deep3", top_k=9)[0]) == 2  # deep3 has 2 classes


def test_tasks_on_other_backbone_weights_are_refused(registry, tiny_backbone, tmp_path):
    torch.manual_seed(7)
    other = create_backbone(tiny_config(), pretrained=False)
    other_weights = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(other_weights))
    save_tasks(other, other_weights, MIXED[:1], ["stranger"])
    with pytest.raises(TaskError, match="different backbones.*fingerprint"):
        load_tasks(["deep3", "stranger"])
    result = runner.invoke(app, ["predict", str(IMAGES[0]), "--task", "deep3", "--task", "stranger"])
    assert result.exit_code == 5 and "different backbones" in result.output


def test_full_fine_tune_cannot_share_the_backbone(registry, tiny_backbone, tiny_weights):
    save_tasks(tiny_backbone, tiny_weights, [PromptConfig("full")], ["full"])
    with pytest.raises(TaskError, match="fine-tunes the whole backbone"):
        load_tasks(["deep3", "full"])


def test_bundle_onnx_matches_each_single_task(tiny_backbone, tmp_path):
    import onnxruntime  # a dev dependency: its absence must fail this test, not skip it

    models = task_models(tiny_backbone.model, MIXED)
    result = export_model(MultiTaskViT(tiny_backbone.model, models), 32, "onnx", tmp_path / "bundle.onnx")
    assert result.checked_with.startswith("onnxruntime") and result.max_abs_diff < 1e-4
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    task_index = torch.tensor([4, 0, 3, 1, 2, 2, 0])
    (logits,) = session.run(None, {"images": images.numpy(), "task_index": task_index.numpy()})
    for row, t in enumerate(task_index.tolist()):
        with torch.inference_mode():
            expected = models[t](images[row : row + 1])[0]
        classes = expected.shape[0]
        assert torch.from_numpy(logits[row, :classes]) == pytest.approx(expected, abs=1e-4)
        assert (logits[row, classes:] == float("-inf")).all()


def test_cli_multi_task_predict_json_csv_table(registry):
    files = [str(path) for path in IMAGES]
    flags = ["--task", "deep3", "--task", "shallow5", "--top-k", "2"]
    as_json = runner.invoke(app, ["predict", *files, *flags, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["tasks"] == ["deep3", "shallow5"] and payload["task"] is None
    rows = payload["predictions"]
    assert [(r["file"], r["task"]) for r in rows] == [(f, t) for f in files for t in ("deep3", "shallow5")]
    single = json.loads(runner.invoke(app, ["predict", *files, "--task", "shallow5", "-k", "2", "--format", "json"]).stdout)
    for mixed_row, single_row in zip([r for r in rows if r["task"] == "shallow5"], single["predictions"]):
        assert [c["class"] for c in mixed_row["top"]] == [c["class"] for c in single_row["top"]]
        assert [c["prob"] for c in mixed_row["top"]] == pytest.approx([c["prob"] for c in single_row["top"]], abs=1e-5)
    assert "img/s" not in as_json.stdout and "img/s" in as_json.stderr

    as_csv = runner.invoke(app, ["predict", *files, *flags, "--format", "csv"])
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(table[0]) == ["file", "task", "rank", "class", "prob"] and len(table) == len(files) * 2 * 2

    as_table = runner.invoke(app, ["predict", files[0], *flags, "--batch-size", "1"])
    assert as_table.exit_code == 0 and "deep3" in as_table.stdout and "shallow5" in as_table.stdout


def test_cli_tasks_from_csv(registry, tmp_path):
    listing = tmp_path / "requests.csv"
    missing = tmp_path / "gone.png"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "task"])
        writer.writerow([str(IMAGES[0]), "proj2"])
        writer.writerow([str(IMAGES[1]), "deep3;shallow5"])
        writer.writerow([str(IMAGES[0]), "deep3"])
        writer.writerow([missing.name, "deep3"])  # relative to the CSV's folder
    result = runner.invoke(app, ["predict", "--tasks-from", listing, "--format", "json", "-k", "1"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [(r["file"], r["task"]) for r in payload["predictions"]] == [
        (str(IMAGES[0]), "proj2"), (str(IMAGES[0]), "deep3"), (str(IMAGES[1]), "deep3"), (str(IMAGES[1]), "shallow5")]
    assert payload["failures"] == [{"file": "gone.png", "reason": "no such file"}]
    both = runner.invoke(app, ["predict", str(IMAGES[0]), "--task", "deep3", "--tasks-from", listing])
    assert both.exit_code == 2
    assert runner.invoke(app, ["predict", str(IMAGES[0])]).exit_code == 2


def test_cli_exports_a_bundle_that_answers_like_each_task(registry, tmp_path):
    import onnxruntime as ort
    output = tmp_path / "bundle.onnx"
    result = runner.invoke(app, ["export", "--task", "deep3", "--task", "shallow5", "--output", output, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["tasks"] == ["deep3", "shallow5"] and payload["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "task_index"]
    server = load_tasks(["deep3", "shallow5"], device="cpu")
    images = torch.stack([server.transform(Image.open(path).convert("RGB")) for path in IMAGES[:2]])
    logits = session.run(None, {"images": images.numpy(), "task_index": torch.tensor([1, 0]).numpy()})[0]
    for row, task in enumerate(["shallow5", "deep3"]):
        single = load_for_inference(task, device="cpu")
        with torch.inference_mode():
            expected = single.model(images[row : row + 1])[0]
        torch.testing.assert_close(torch.from_numpy(logits[row, : len(expected)]), expected, atol=1e-4, rtol=0)


def test_exports_carry_classes_and_preprocessing_and_default_to_the_task_name(registry, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["export", "--task", "deep3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == "deep3.onnx" and (tmp_path / "deep3.onnx").is_file()
    meta = ort.InferenceSession("deep3.onnx", providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == ["deep30", "deep31"] and json.loads(meta["vpt_tasks"]) == ["deep3"]
    assert meta["image_size"] == "32" and json.loads(meta["mean"]) == [0.5, 0.5, 0.5]

    result = runner.invoke(app, ["export", "--task", "deep3", "--task", "shallow5", "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    extra = {"classes.txt": "", "vpt_tasks.txt": "", "interpolation.txt": ""}
    torch.jit.load(str(tmp_path / "deep3_shallow5.pt"), _extra_files=extra)
    assert json.loads(extra["vpt_tasks.txt"]) == ["deep3", "shallow5"]  # values come back as bytes
    assert [len(c) for c in json.loads(extra["classes.txt"])] == [2, 3] and extra["interpolation.txt"] == b"bicubic"


def test_cli_dynamic_size_export_of_a_bundle(registry, tmp_path):
    import onnxruntime as ort

    result = runner.invoke(app, ["export", "--task", "deep3", "--task", "shallow5", "--dynamic-size", "--output",
                                 str(tmp_path / "any.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(tmp_path / "any.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["dynamic_size"] == "true"
    images = torch.randn(2, 3, 48, 40).numpy()
    (logits,) = session.run(None, {"images": images, "task_index": torch.tensor([0, 1]).numpy()})
    assert logits.shape == (2, 3) and torch.isfinite(torch.from_numpy(logits[:, :2])).all()
