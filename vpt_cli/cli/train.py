"""vpt train and vpt sweep: a run's config from YAML and flags, then api.train/resume/sweep."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vpt_cli.cli.common import (
    choice_value,
    err,
    is_follower,
    launch_if_asked,
    make_reporter,
    out,
    path_text,
    print_json,
    run_command,
)
from vpt_cli.cli.options import (
    DEFAULT_POOL,
    DEFAULTS,
    DROPOUT_DEFAULTS,
    METHOD_HELP,
    SWEEP_DEFAULTS,
    Augment,
    BackboneArgOpt,
    BackboneOpt,
    BackboneWeightsOpt,
    BalanceOpt,
    ConfigOpt,
    DataArg,
    DataFormatOpt,
    DevicesOpt,
    EpochsOpt,
    ExistOkOpt,
    ForceOpt,
    ImgSizeOpt,
    JsonOpt,
    LabelSepOpt,
    LossOpt,
    Method,
    MultiLabelOpt,
    Optimizer,
    Pool,
    ProjectOpt,
    PromptInit,
    QuietOpt,
    RunNameOpt,
    SeedOpt,
    Select,
    ShotsOpt,
    TaskNameOpt,
    TauOpt,
    TensorboardOpt,
    ThresholdOpt,
    TrainDeviceOpt,
    TrainvalOpt,
    WorkersOpt,
    shown_default,
)
from vpt_cli.config import (
    ADAMW_HEAD_LR,
    ADAMW_PROMPT_LR,
    AUTO_PROMPT_FRACTION,
    MIN_VAL_PER_CLASS_TO_SELECT,
    SGD_BASE_LR,
    TOKEN_INIT_IMAGES,
)
from vpt_cli.core.errors import UsageError


def _parse_backbone_args(items: list[str]) -> dict[str, Any]:
    """`--backbone-arg depth=2` -> {"depth": 2}; values are parsed as YAML scalars."""
    import yaml

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--backbone-arg expects KEY=VALUE, got '{item}'")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed



def _common_overrides(*, data: Path, backbone: Optional[str], backbone_weights: Optional[Path],
                      backbone_arg: list[str], img_size: Optional[int], method: Optional[Enum], epochs: Optional[int],
                      seed: Optional[int], device: Optional[Enum], workers: Optional[int],
                      data_format: Optional[Enum], trainval: Optional[bool], shots: Optional[int],
                      balance: Optional[Enum], tau: Optional[float], multi_label: Optional[bool],
                      label_sep: Optional[str], loss: Optional[Enum], threshold: Optional[float]) -> dict[str, Any]:
    """Config overrides from the options `train` and `sweep` share (None: not given, YAML wins)."""
    return {
        "data.path": str(data), "backbone.name": backbone, "backbone.weights": path_text(backbone_weights),
        "backbone.img_size": img_size, "backbone.kwargs": _parse_backbone_args(backbone_arg) or None,
        "prompt.method": choice_value(method), "train.epochs": epochs, "train.seed": seed, "train.device": choice_value(device),
        "data.workers": workers, "data.format": choice_value(data_format), "data.trainval": trainval, "data.shots": shots,
        "train.balance": choice_value(balance), "train.tau": tau, "data.multi_label": multi_label,
        "data.label_sep": label_sep, "train.loss": choice_value(loss), "train.threshold": threshold,
    }



def train(
    data: DataArg,
    task: TaskNameOpt = None,
    backbone: BackboneOpt = None,
    backbone_weights: BackboneWeightsOpt = None,
    backbone_arg: BackboneArgOpt = [],
    img_size: ImgSizeOpt = None,
    data_format: DataFormatOpt = None,
    trainval: TrainvalOpt = None,
    shots: ShotsOpt = None,
    balance: BalanceOpt = None,
    tau: TauOpt = None,
    multi_label: MultiLabelOpt = None,
    label_sep: LabelSepOpt = None,
    loss: LossOpt = None,
    threshold: ThresholdOpt = None,
    method: Annotated[Optional[Method], typer.Option(help=METHOD_HELP + " " + shown_default(DEFAULTS.prompt.method))] = None,
    prompts: Annotated[Optional[int], typer.Option("--prompts", help=f"Prompt tokens per layer. {shown_default(f'auto, {AUTO_PROMPT_FRACTION:.0%} of the patch tokens and at least 1: 10 at 224 px with 16 px patches, 1 at 56 px with 14 px')}")] = None,
    prompt_dropout: Annotated[Optional[float], typer.Option(help=f"Dropout on prompt tokens. {shown_default(DROPOUT_DEFAULTS)}")] = None,
    prompt_init: Annotated[Optional[PromptInit], typer.Option(help=f"How prompts start: tokens (patch tokens the frozen backbone sees at each layer, from {TOKEN_INIT_IMAGES} training images) or uniform (the paper's random init). {shown_default(DEFAULTS.prompt.init)}")] = None,
    pool: Annotated[Optional[Pool], typer.Option(help=f"How the last layer becomes features: token (the CLS output), avg (the mean of every token after the prefix, prompts included, then fc_norm; MAE and MoCo v3 in the paper), avg-patches or avg-prompts (the mean of those only). {shown_default(DEFAULT_POOL)}")] = None,
    epochs: EpochsOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Images per step. {shown_default(DEFAULTS.train.batch_size)}")] = None,
    optimizer: Annotated[Optional[Optimizer], typer.Option(help=f"adamw (tuned for small folders) or sgd (the paper's recipe). {shown_default(DEFAULTS.train.optimizer)}")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Prompt learning rate. {shown_default(f'{ADAMW_PROMPT_LR:g} adamw; {SGD_BASE_LR:g}*batch/256 sgd')}")] = None,
    head_lr: Annotated[Optional[float], typer.Option(help=f"Head learning rate. {shown_default(f'{ADAMW_HEAD_LR:g} adamw; = --lr sgd')}")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=f"Weight decay (head; all but head bias with sgd). {shown_default(f'{DEFAULTS.train.weight_decay:g}')}")] = None,
    val_split: Annotated[Optional[float], typer.Option(help=f"Stratified held-out fraction when DATA has no val/ folder. {shown_default(DEFAULTS.data.val_split)}")] = None,
    augment: Annotated[Optional[Augment], typer.Option(help=f"none, flip, or crop (random resized crop + flip). {shown_default(DEFAULTS.data.augment)}")] = None,
    select: Annotated[Optional[Select], typer.Option(help=f"Which epoch becomes the task: best (on val, the probe's start included), last, or auto: best when val has at least {MIN_VAL_PER_CLASS_TO_SELECT} images per class, else last. {shown_default(DEFAULTS.train.select)}")] = None,
    patience: Annotated[Optional[int], typer.Option(help=f"Stop after this many epochs without val improvement (0: never; only when the best epoch is kept). {shown_default(DEFAULTS.train.patience)}")] = None,
    seed: SeedOpt = None,
    device: TrainDeviceOpt = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help=f"Mixed precision (bf16, or fp16 on GPUs without bf16). {shown_default(DEFAULTS.train.amp)}")] = None,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of this task after its last finished epoch, with every setting its checkpoint holds (only --epochs, --device and --workers may change).")] = False,
    project: ProjectOpt = None,
    name: RunNameOpt = None,
    exist_ok: ExistOkOpt = False,
    tensorboard: TensorboardOpt = False,
    devices: DevicesOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a task on a folder of images.

    Example: [bold]vpt train ./photos --task birds --backbone-weights vit_b16.safetensors[/]
    """

    def action() -> None:
        from vpt_cli import api
        from vpt_cli.config import load_config

        launch_if_asked(devices)
        overrides = _common_overrides(data=data, backbone=backbone, backbone_weights=backbone_weights,
                                      backbone_arg=backbone_arg, img_size=img_size, method=method, epochs=epochs,
                                      seed=seed, device=device, workers=workers, data_format=data_format,
                                      trainval=trainval, shots=shots, balance=balance, tau=tau,
                                      multi_label=multi_label, label_sep=label_sep, loss=loss, threshold=threshold)
        overrides.update({
            "prompt.num_prompts": prompts, "prompt.dropout": prompt_dropout, "prompt.init": choice_value(prompt_init),
            "prompt.pool": choice_value(pool),
            "train.batch_size": batch_size,
            "train.optimizer": choice_value(optimizer), "train.lr": lr, "train.head_lr": head_lr,
            "train.weight_decay": weight_decay, "data.val_split": val_split, "data.augment": choice_value(augment),
            "train.select": choice_value(select), "train.patience": patience, "train.amp": amp,
        })
        run_folder = _run_folder(project, name, exist_ok, "runs/train", tensorboard)
        if resume:  # every setting comes from the checkpoint; the flags given may only extend or move it
            if config is not None:
                raise UsageError("--resume takes its settings from the run's checkpoint; drop --config")
            result = api.resume(task, overrides, folder=run_folder, reporter=make_reporter(quiet))
        else:
            result = api.train(load_config(config, overrides), task=task, force=force, reporter=make_reporter(quiet),
                               folder=run_folder)
        if is_follower():
            return
        if as_json:
            print_json(result.to_dict())
            return
        from vpt_cli.cli.render import render_train

        render_train(out, result)

    run_command(action)



def _floats(text: str, flag: str) -> list[float]:
    """'1e-3,3e-3' -> [0.001, 0.003]; a bad item is a usage error naming the flag."""
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, not '{text}'") from None



def _csv(values: tuple[float, ...]) -> str:
    return ",".join(f"{value:g}" for value in values)



def sweep(
    data: DataArg,
    task: TaskNameOpt = None,
    lr: Annotated[str, typer.Option("--lr", help="Prompt learning rates to try, comma-separated.")] = _csv(SWEEP_DEFAULTS.lrs),
    weight_decay: Annotated[str, typer.Option("--weight-decay", help="Weight decays to try, comma-separated.")] = _csv(SWEEP_DEFAULTS.weight_decays),
    prompts: Annotated[str, typer.Option("--prompts", help=f"Prompt lengths to try, comma-separated (e.g. 5,10,50). {shown_default('the config' + chr(39) + 's, auto')}")] = "",
    budget: Annotated[Optional[str], typer.Option("--budget", help=f"At most this many trials (12) or this much time (15m, 90s, 1h). {shown_default('the whole grid')}")] = SWEEP_DEFAULTS.budget,
    eta: Annotated[int, typer.Option("--eta", help="Successive halving: after each rung only the best 1/eta of the trials go on.")] = SWEEP_DEFAULTS.eta,
    method: Annotated[Optional[Method], typer.Option(help=f"vpt-deep or vpt-shallow. {shown_default(DEFAULTS.prompt.method)}")] = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"Epochs of a trial that survives every rung. {shown_default(DEFAULTS.train.epochs)}")] = None,
    backbone: BackboneOpt = None,
    backbone_weights: BackboneWeightsOpt = None,
    backbone_arg: BackboneArgOpt = [],
    img_size: ImgSizeOpt = None,
    data_format: DataFormatOpt = None,
    shots: ShotsOpt = None,
    balance: BalanceOpt = None,
    tau: TauOpt = None,
    multi_label: MultiLabelOpt = None,
    label_sep: LabelSepOpt = None,
    loss: LossOpt = None,
    threshold: ThresholdOpt = None,
    seed: SeedOpt = None,
    device: TrainDeviceOpt = None,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    project: ProjectOpt = None,
    name: RunNameOpt = None,
    exist_ok: ExistOkOpt = False,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live table.")] = False,
) -> None:
    """Search lr x weight decay (x prompt length) on the val split; keep the best trial as the task.

    Cheap trials start first; successive halving stops the weaker ones early. Every trial is
    written to sweep.csv in the task's run folder. Example: [bold]vpt sweep ./photos --budget 20m[/]
    """

    def action() -> None:
        from vpt_cli import api
        from vpt_cli.cli.live_sweep import LiveSweepTable
        from vpt_cli.cli.render import render_sweep
        from vpt_cli.config import load_config

        overrides = _common_overrides(data=data, backbone=backbone, backbone_weights=backbone_weights,
                                      backbone_arg=backbone_arg, img_size=img_size, method=method, epochs=epochs,
                                      seed=seed, device=device, workers=workers, data_format=data_format,
                                      trainval=None, shots=shots, balance=balance, tau=tau,
                                      multi_label=multi_label, label_sep=label_sep, loss=loss, threshold=threshold)
        run_config = load_config(config, overrides)
        lengths = [int(v) for v in _floats(prompts, "--prompts")] or [run_config.prompt.num_prompts]
        with LiveSweepTable(err, quiet=quiet) as live:
            result = api.sweep(run_config, _floats(lr, "--lr"), _floats(weight_decay, "--weight-decay"), lengths,
                               eta=eta, budget=budget, task=task, force=force, reporter=live,
                               folder=_run_folder(project, name, exist_ok, "runs/sweep"))
        if as_json:
            print_json(result.to_dict())
        else:
            render_sweep(out, result)

    run_command(action)



def _run_folder(project: Optional[Path], name: Optional[str], exist_ok: bool, default: str,
                tensorboard: bool = False) -> Any:
    from vpt_cli.training.run_folder import RunFolder

    return RunFolder(project=project or default, name=name, exist_ok=exist_ok, tensorboard=tensorboard)
