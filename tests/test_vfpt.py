"""Visual Fourier Prompt Tuning (docs/vfpt.md): the transform against an explicit DFT, fraction 0
as vpt-deep bit for bit, and the folded task file answering as the training-time forward in
every family, alone, in a mixed batch and after a real (tiny) training run with raw checkpoints."""
from __future__ import annotations

import math
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_engine import SAMPLE, tiny_run
from test_families import FAMILIES, prompted

from vpt_cli import api
from vpt_cli.artifact.schema import Task, TaskInfo, load_task, save_task
from vpt_cli.config import PromptConfig, RunConfig
from vpt_cli.core.errors import TaskError, UsageError
from vpt_cli.methods.fourier import fourier_count, fourier_prompts
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.folding import fold_task_state, prompts_sha256
from vpt_cli.models.multitask import MultiTaskViT
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.serving.loading import load_for_inference
from vpt_cli.training.sweep import plan_sweep, run_sweep


def explicit_fourier(prompts: torch.Tensor, count: int) -> torch.Tensor:
    """Re(DFT_seq(DFT_hidden(P))) of the first `count` rows written out as the double sum
    X[u, v] = sum_m sum_n P[m, n] cos(2 pi (u m / count + v n / D)), in float64."""
    head = prompts[:count].double()
    u = torch.arange(count, dtype=torch.float64)
    v = torch.arange(prompts.shape[1], dtype=torch.float64)
    angle = 2 * math.pi * (u[:, None, None, None] * u[None, None, :, None] / count
                           + v[None, :, None, None] * v[None, None, None, :] / prompts.shape[1])
    mixed = (head[None, None] * torch.cos(angle)).sum(dim=(2, 3))
    return torch.cat([mixed, prompts[count:].double()])


def test_the_transform_is_the_real_part_of_the_2d_fft_of_the_first_rows():
    torch.manual_seed(0)
    prompts = torch.randn(5, 12, dtype=torch.float64)
    got = fourier_prompts(prompts, 0.6)
    assert torch.allclose(got, explicit_fourier(prompts, 3), atol=1e-10)
    assert torch.allclose(got[:3], torch.fft.fft2(prompts[:3]).real, atol=1e-12)
    assert torch.equal(got[3:], prompts[3:])
    assert fourier_prompts(prompts, 0.0) is prompts  # no Fourier rows: untouched, bit for bit


@pytest.mark.parametrize("prompts, fraction, count",
                         [(10, 0.5, 5), (100, 0.29, 29), (1, 0.5, 0), (3, 1.0, 3), (7, 0.0, 0)])
def test_the_fourier_rows_are_floor_of_fraction_times_prompts(prompts, fraction, count):
    assert fourier_count(prompts, fraction) == count


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_backbone(tiny_config(), pretrained=False)


@pytest.fixture(scope="module")
def vit(tiny):
    return tiny.model


def folded_model(backbone, model: PromptedViT, prompt: PromptConfig) -> PromptedViT:
    """What loading a task file gives: the folded tensors in a model that does not transform them."""
    tensors, stored = fold_task_state(model.task_state_dict(), prompt)
    assert stored["fourier_fraction"] == prompt.resolved_fraction and len(stored["folded_from"]) == 64
    loaded = PromptedViT(backbone, model.head.out_features, prompt, folded=True)
    loaded.load_task_state_dict(tensors)
    return loaded.eval()


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_the_folded_task_answers_as_the_training_forward(vit, family):
    """Folded prompts in the plain forward give the logits the raw prompts give through the
    transform, alone and in a mixed batch; Swin's per-block prompts in stage widths too (the
    transform sits in `layer_prompts`, ahead of every family's adapter, each of which
    tests/test_families.py checks)."""
    backbone = vit if family == "vit" else create_backbone(FAMILIES[family], pretrained=False).model
    prompt = PromptConfig(method="vfpt", num_prompts=4, fourier_fraction=0.5, init="uniform")
    model = prompted(backbone, prompt)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
        folded = folded_model(backbone, model, prompt)
        assert folded.transform is None and not torch.equal(folded.prompts[0], model.prompts[0])
        assert torch.allclose(folded(images), expected, atol=1e-6, rtol=0)
        other = prompted(backbone, PromptConfig(method="vpt-deep", num_prompts=2, init="uniform"), seed=3)
        mixed = MultiTaskViT(backbone, [folded, other])(images, torch.tensor([0, 1, 0]))
    assert torch.allclose(mixed[[0, 2], :3], expected[[0, 2]], atol=1e-5, rtol=0)


def test_vfpt_shallow_transforms_the_first_layer_only(vit):
    prompt = PromptConfig(method="vfpt-shallow", num_prompts=4, fourier_fraction=1.0, init="uniform")
    model = prompted(vit, prompt)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert model.prompts.shape[0] == 1 and model.layer_prompts(1, 2) is None
        assert torch.allclose(folded_model(vit, model, prompt)(images), model(images), atol=1e-6, rtol=0)


def test_fraction_zero_is_vpt_deep_bit_for_bit(vit):
    """The same logits, the same training step (prompt dropout drawn alike) and the same task tensors."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    deep = prompted(vit, PromptConfig(method="vpt-deep", num_prompts=3, init="uniform"))
    prompt = PromptConfig(method="vfpt", num_prompts=3, fourier_fraction=0.0, init="uniform")
    fourier = prompted(vit, prompt)
    with torch.no_grad():
        assert torch.equal(fourier(images), deep(images))
    for model in (deep, fourier):
        torch.manual_seed(5)
        model.train()(images).logsumexp(dim=1).sum().backward()
    assert torch.equal(fourier.prompts.grad, deep.prompts.grad)
    assert torch.equal(fourier.head.weight.grad, deep.head.weight.grad)
    tensors, _ = fold_task_state(fourier.task_state_dict(), prompt)
    assert all(torch.equal(tensors[name], tensor) for name, tensor in deep.task_state_dict().items())


@pytest.fixture
def few_images(tmp_path):
    """Two training and one val image per class of the sample data: a run in a fraction of a second."""
    for split, count in (("train", 2), ("val", 1)):
        for folder in sorted((SAMPLE / split).iterdir()):
            (tmp_path / "few" / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copy(image, tmp_path / "few" / split / folder.name)
    return tmp_path / "few"


def test_a_trained_task_stores_folded_prompts_and_the_checkpoint_raw_ones(tiny_weights, few_images):
    """A real run: the checkpoint keeps the raw prompts (what --resume continues from), the task
    file the folded ones with the raw prompts' sha256, and the loaded task answers as the model
    that finished training."""
    config = tiny_run(tiny_weights, epochs=1, select="last", head_init="zeros")  # zeros: no probe fit, fast
    config.data.path, config.data.workers = str(few_images), 0
    config.prompt = PromptConfig(method="vfpt", num_prompts=2, fourier_fraction=0.5)
    result = api.train(config, task="fourier")
    task = load_task(result.task_path)
    saved = load_file(str(result.run_dir / "checkpoint.safetensors"))
    raw = {k.removeprefix("best."): v for k, v in saved.items() if k.startswith("best.")}
    assert task.info.prompt["fourier_fraction"] == 0.5 and task.info.prompt["folded_from"] == prompts_sha256(raw)
    assert torch.equal(task.tensors["prompts"], fold_task_state(raw, config.prompt)[0]["prompts"])
    loaded = load_for_inference(result.task_path)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    trained = PromptedViT(loaded.backbone.model, len(result.classes), config.prompt)
    trained.load_task_state_dict(raw)
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), trained.eval()(images), atol=1e-6, rtol=0)


def test_fourier_settings_are_checked_in_configs_and_task_files(tiny, tmp_path):
    with pytest.raises(UsageError, match="applies to vfpt and vfpt-shallow, not --method vpt-deep"):
        RunConfig(prompt=PromptConfig(method="vpt-deep", fourier_fraction=0.5)).validate()
    with pytest.raises(UsageError, match=r"--fourier-fraction must be in \[0, 1\]"):
        RunConfig(prompt=PromptConfig(method="vfpt", fourier_fraction=1.5)).validate()
    RunConfig(prompt=PromptConfig(method="vpt-deep", fourier_fraction=0.0)).validate()  # what args.yaml records
    assert PromptConfig(method="vfpt").resolved_fraction == 0.5 and PromptConfig().resolved_fraction is None
    prompt = PromptConfig(method="vfpt", num_prompts=2, fourier_fraction=0.5, init="uniform")
    tensors, stored = fold_task_state(prompted(tiny.model, prompt).task_state_dict(), prompt)
    info = TaskInfo(name="t", backbone=tiny.name, backbone_fingerprint="0" * 32, img_size=32,
                    data_config=dict(tiny.data_config, input_size=list(tiny.data_config["input_size"]),
                                     mean=list(tiny.data_config["mean"]), std=list(tiny.data_config["std"])),
                    prompt=stored, classes=["a", "b", "c"])
    assert load_task(save_task(Task(info, tensors), tmp_path / "ok.safetensors")).info.prompt == stored
    for change, message in [({"folded_from": None}, "folded_from must be the sha256"),
                            ({"folded_from": "x" * 64}, "folded_from must be the sha256"),
                            ({"fourier_fraction": 2.0}, r"fourier_fraction must be a number in \[0.0, 1.0\]"),
                            ({"method": "vpt-deep"}, "are for Fourier prompts, not vpt-deep")]:
        bad = replace(info, prompt={**info.prompt, **change})
        with pytest.raises(TaskError, match=message):
            load_task(save_task(Task(bad, tensors), tmp_path / "bad.safetensors", force=True))


def test_the_sweep_searches_fractions_across_every_lr_and_weight_decay():
    """Each pass over the lr x wd cells rotates the fractions, so a budget cut short still tries them all."""
    plan = plan_sweep([1e-3, 1e-2], [0.0, 1e-4], [None], epochs=3, fourier_fractions=[0.25, 1.0])
    points = [(t.lr, t.weight_decay, t.fourier_fraction) for t in plan.trials]
    assert len(set(points)) == 8
    assert len({(lr, wd) for lr, wd, _ in points[:4]}) == 4 and {f for *_, f in points[:4]} == {0.25, 1.0}
    with pytest.raises(UsageError, match="not --method vpt-deep"):
        run_sweep(RunConfig(prompt=PromptConfig(method="vpt-deep")), plan)


def test_token_init_leaves_the_fourier_prompts_uniform(vit):
    """A transformed patch token is no patch token: the Fourier rows keep the paper's uniform
    init, the plain prompts start as tokens."""
    model = PromptedViT(vit, 3, PromptConfig(method="vfpt", num_prompts=4, fourier_fraction=0.5))
    uniform = model.prompts.detach().clone()
    model.init_prompts_from_tokens(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(model.prompts[:, :2], uniform[:, :2]) and not torch.equal(model.prompts[:, 2:], uniform[:, 2:])
