"""Training loop behaviour: schedule, parameter groups, probe init, selection, stopping, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from vpt_cli import api
from vpt_cli.artifact.home import resolve_task_path
from vpt_cli.artifact.schema import load_task
from vpt_cli.config import PromptConfig, RunConfig, TrainConfig
from vpt_cli.core.errors import TaskError, Terminated, TrainingInterrupted
from vpt_cli.models.prompted import PromptedViT
from vpt_cli.runtime.context import RunContext
from vpt_cli.runtime.reporting import Reporter
from vpt_cli.training import engine
from vpt_cli.training.prepare import check_run, prepare_run
from vpt_cli.training.probe import fit_linear_head
from vpt_cli.training.resume import Checkpoint
from vpt_cli.training.run_folder import claim_task

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def tiny_run(weights, **train) -> RunConfig:
    config = RunConfig(backbone=tiny_config(weights=str(weights)), train=TrainConfig(**train))
    config.prompt.num_prompts = 2
    config.data.path = str(SAMPLE)
    return config


def test_warmup_then_cosine_to_zero():
    factor = engine.warmup_cosine(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5, abs=1e-6)
    assert factor(100) == pytest.approx(0.0, abs=1e-9)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 100))


def test_parameter_groups_follow_each_recipe(tiny_backbone):
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=2))
    adamw = engine.build_optimizer(model, TrainConfig(lr=0.01, head_lr=0.002, weight_decay=0.05))
    groups = {g["name"]: g for g in adamw.param_groups}
    assert isinstance(adamw, torch.optim.AdamW)
    assert set(groups) == {"prompts", "head", "head_bias"}
    assert (groups["prompts"]["lr"], groups["prompts"]["weight_decay"]) == (0.01, 0.0)
    assert (groups["head"]["lr"], groups["head"]["weight_decay"]) == (0.002, 0.05)
    assert [p.shape for p in groups["head_bias"]["params"]] == [model.head.bias.shape]
    assert groups["head_bias"]["weight_decay"] == 0.0
    sgd = engine.build_optimizer(model, TrainConfig(optimizer="sgd", batch_size=128, weight_decay=1e-4))
    groups = {g["name"]: g for g in sgd.param_groups}
    assert sgd.defaults["momentum"] == 0.9
    assert groups["prompts"]["lr"] == pytest.approx(2.5 * 128 / 256)
    assert groups["prompts"]["weight_decay"] == 1e-4 and groups["head_bias"]["weight_decay"] == 0.0


def test_linear_head_fit_solves_a_separable_problem():
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 3
    labels = torch.arange(4).repeat(50)
    features = centers[labels] + 0.3 * torch.randn(200, 16)
    weight, bias = fit_linear_head(features, labels, 4, weight_decay=1e-3)
    assert ((features @ weight.T + bias).argmax(1) == labels).float().mean() == 1.0


def test_training_keeps_the_best_epoch_and_never_ends_below_the_probe(tiny_weights):
    config = tiny_run(tiny_weights, epochs=2, lr=50.0, head_lr=50.0, patience=0, select="best")  # lr that wrecks the model
    result = api.train(config, task="wrecked")
    assert result.probe_val_acc is not None
    assert result.val_report.top1 >= result.probe_val_acc - 1e-6

    class Lines(Reporter):
        def __init__(self):
            self.lines = []

        def log(self, message):
            self.lines.append(message)

    config.train.select = "last"  # keeps the wrecked model, and says so
    lines = Lines()
    wrecked = api.train(config, task="wrecked", force=True, reporter=lines)
    assert wrecked.val_report.top1 < wrecked.probe_val_acc - engine.LAST_EPOCH_WARNING_GAP
    assert any(line.startswith("warning: the last epoch") for line in lines.lines)


@pytest.mark.parametrize("init", ["tokens", "uniform"])
def test_start_seeds_prompts_from_training_images_unless_uniform(tiny_weights, init):
    config = tiny_run(tiny_weights, epochs=1)
    config.prompt.init = init
    splits = check_run(config)
    with claim_task(config, "start", force=True) as claimed:
        run = prepare_run(config, claimed, splits, Reporter())
    model = PromptedViT(run.backbone.model, len(run.classes), run.config.prompt)
    paper_init = model.prompts.detach().clone()
    engine.TrainingRun(model, run.train_loader, run.val_loader, run.classes, config.train,
                       RunContext(run.device)).start(run.probe_loader)
    assert torch.equal(model.prompts, paper_init) == (init == "uniform")


def test_early_stopping_without_improvement(tiny_weights):
    config = tiny_run(tiny_weights, epochs=10, lr=0.0, head_lr=0.0, patience=2, select="best")
    result = api.train(config, task="flat")
    assert result.stopped_early and len(result.history) == 2 and result.best_epoch == 0


def test_interrupt_saves_a_checkpoint_and_resume_finishes(tiny_weights, monkeypatch):
    real_epoch = engine.train_one_epoch
    calls = {"n": 0}

    def interrupted_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", interrupted_second_epoch)
    config = tiny_run(tiny_weights, epochs=3, patience=0)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        api.train(config, task="resumable")
    checkpoint = Path("runs/train/resumable/checkpoint.safetensors")
    assert checkpoint.is_file()
    assert not resolve_task_path("resumable").exists()  # no half-trained task is published

    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    result = api.train(config, task="resumable", resume=True)
    assert [h.epoch for h in result.history] == [1, 2, 3]
    assert resolve_task_path("resumable").is_file()

    changed = tiny_run(tiny_weights, epochs=3, patience=0, lr=0.5)
    with pytest.raises(TaskError, match=r"other settings \(train.lr None -> 0.5\)"):
        api.train(changed, task="resumable", resume=True, force=True)
    with pytest.raises(TaskError, match="finished, so there is nothing to resume"):
        api.train(config, task="resumable", resume=True)


class InterruptIn(Reporter):
    """Raises Ctrl-C (or SIGTERM's Terminated) a few batches into epoch `epoch`."""

    def __init__(self, epoch: int, error: type[BaseException] = KeyboardInterrupt):
        self.epoch, self.error, self.current = epoch, error, None

    def start(self, description, total):
        self.current = description

    def advance(self, steps=1):
        if self.current.startswith(f"epoch {self.epoch}/"):
            raise self.error()


@pytest.mark.parametrize("workers", [0, 1])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tiny_weights, workers):
    """Prompt dropout, shuffling and flip augmentation all draw random numbers: the checkpoint
    carries every generator, so the resumed run repeats the uninterrupted one bit for bit."""
    config = tiny_run(tiny_weights, epochs=3, patience=0)
    config.data.workers = workers
    straight = api.train(config, task="straight")
    with pytest.raises(TrainingInterrupted, match="epoch 1 is saved") as interrupted:
        api.train(config, task="resumed", reporter=InterruptIn(2, Terminated))
    assert interrupted.value.exit_code == 143
    resumed = api.train(config, task="resumed", resume=True)
    expected, got = load_task(straight.task_path).tensors, load_task(resumed.task_path).tensors
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in straight.history]


def test_interrupt_before_the_first_epoch_says_nothing_to_resume(tiny_weights):
    config = tiny_run(tiny_weights, epochs=2)
    config.data.workers = 0  # a loader worker interrupted mid-epoch takes seconds to shut down
    with pytest.raises(TrainingInterrupted, match="nothing to resume"):
        api.train(config, task="early", reporter=InterruptIn(1))
    with pytest.raises(TaskError, match="nothing to resume: no checkpoint"):
        api.train(config, task="early", resume=True)


def test_checkpoint_roundtrip_restores_weights_and_optimizer(tiny_backbone, tmp_path):
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=2))
    optimizer = engine.build_optimizer(model, TrainConfig())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler.step()
    checkpoint = Checkpoint(tmp_path / "last.safetensors")
    rng = {"torch": torch.get_rng_state(), "python": [3, list(range(625)), None]}
    checkpoint.save(model=model, best_state=model.task_state_dict(), optimizer=optimizer, scheduler=scheduler,
                    state={"epoch": 4}, settings={"train.lr": 0.1}, rng=rng)
    assert checkpoint.settings() == {"train.lr": 0.1}
    fresh = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=2))
    fresh_optimizer = engine.build_optimizer(fresh, TrainConfig())
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 0.5)
    best, state, restored = checkpoint.load(model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert state == {"epoch": 4} and fresh_scheduler.last_epoch == scheduler.last_epoch == 1
    assert torch.equal(restored["torch"], rng["torch"]) and restored["python"] == rng["python"]
    assert torch.equal(fresh.prompts, model.prompts) and torch.equal(best["prompts"], model.prompts)
    exp_avg = lambda opt: opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]
    assert torch.equal(exp_avg(fresh_optimizer), exp_avg(optimizer))


@pytest.mark.parametrize("amp, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_amp_trains_the_blocks_in_bfloat16_on_cpu(tiny_backbone, amp, dtype):
    model = PromptedViT(tiny_backbone.model, 3, PromptConfig(num_prompts=2))
    seen = []
    model.backbone.blocks[0].mlp.fc1.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    optimizer = engine.build_optimizer(model, TrainConfig())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), torch.arange(4))] * 2
    before = model.prompts.detach().clone()
    loss, _, _ = engine.train_one_epoch(model, batches, optimizer, scheduler, scaler,
                                        RunContext(torch.device("cpu"), amp), "epoch")
    assert set(seen) == {dtype}  # autocast really ran (or really did not)
    assert loss == loss and not torch.equal(model.prompts, before)  # finite, and the prompts learned
    assert model.prompts.dtype == torch.float32  # master weights stay fp32


def test_cli_resume_restores_every_setting_and_may_only_extend(tiny_weights):
    """`vpt train DATA --task t --resume` needs no other flag: backbone, prompts and recipe come
    from the checkpoint; --epochs may extend the run, any other changed flag is refused."""
    from typer.testing import CliRunner

    from vpt_cli.cli.app import app

    config = tiny_run(tiny_weights, epochs=3, patience=0)
    config.prompt.num_prompts = None  # 'auto': resolved after the checkpoint's settings are compared
    with pytest.raises(TrainingInterrupted):
        api.train(config, task="cli-resume", reporter=InterruptIn(2))
    runner = CliRunner()
    refused = runner.invoke(app, ["train", str(SAMPLE), "--task", "cli-resume", "--resume", "--lr", "0.5", "-q"])
    assert refused.exit_code == 2 and "train.lr None -> 0.5" in refused.stderr
    # the run folder alone says what to resume: its checkpoint names the task and holds the settings
    extended = runner.invoke(app, ["train", "runs/train/cli-resume", "--resume", "--epochs", "4", "--json", "-q"])
    assert extended.exit_code == 0, extended.output
    payload = json.loads(extended.stdout)
    assert [h["epoch"] for h in payload["history"]] == [1, 2, 3, 4]
    assert payload["run_dir"].endswith("runs/train/cli-resume")
