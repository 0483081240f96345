"""The `vpt` command: a thin Typer layer over vpt_cli.api.

Each command parses its options, calls one library function and renders the result with rich
(or prints it as JSON). torch is imported only inside commands so `vpt --help` starts fast.
Errors the user can fix end with one line on stderr and a documented exit code.
"""
from __future__ import annotations

import csv
import io
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, List, Optional

import typer
from rich.console import Console

from vpt_cli import __version__
from vpt_cli.config import (ADAMW_HEAD_LR, ADAMW_PROMPT_LR, AUGMENTS, AUTO_PROMPT_FRACTION, AVG_POOLED_TAGS, BALANCES,
                            DATA_FORMATS, DEEP_PROMPT_DROPOUT, DEVICES, METHODS, MIN_VAL_PER_CLASS_TO_SELECT,
                            OPTIMIZERS, POOLS, PROMPT_INITS, SELECTS, SGD_BASE_LR, TOKEN_INIT_IMAGES, RunConfig,
                            SweepConfig)
from vpt_cli.errors import Terminated, UsageError, VPTError, one_line
from vpt_cli.fileio import strict_json
from vpt_cli.safetext import printable, safe

if TYPE_CHECKING:
    from vpt_cli.reporting import EpochStats

app = typer.Typer(
    name="vpt",
    help="Visual Prompt Tuning for pretrained Vision Transformers: train a tiny task on a folder of "
    "images, then evaluate, predict and export it. A task is a few prompt tokens and a linear head "
    "on a frozen timm backbone.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
out = Console()
err = Console(stderr=True)
_PIPE_WIDTH = 10_000


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum for Typer built from config's tuple, so each choice list is defined once."""
    return Enum(name, [(value, value) for value in values], type=str)


Method = _choices("Method", METHODS)
Optimizer = _choices("Optimizer", OPTIMIZERS)
Augment = _choices("Augment", AUGMENTS)
Device = _choices("Device", DEVICES)
Select = _choices("Select", SELECTS)
DataFormat = _choices("DataFormat", DATA_FORMATS)
Balance = _choices("Balance", BALANCES)
PromptInit = _choices("PromptInit", PROMPT_INITS)
Pool = _choices("Pool", POOLS)
OutputFormat = _choices("OutputFormat", ("table", "json", "csv"))
ExportFormat = _choices("ExportFormat", ("onnx", "torchscript"))


_DEFAULTS = RunConfig()
_DEFAULT_POOL = _DEFAULTS.prompt.pool or f"the backbone's own; avg for .{', .'.join(AVG_POOLED_TAGS)} tags"
_SWEEP = SweepConfig()


def _default(text: Any) -> str:
    """A help suffix showing a default; the bracket is escaped so rich markup does not eat it."""
    return f"\\[default: {text}]"


TASK_HELP = "Task name in the registry ($VPT_HOME/tasks) or path to a .safetensors task file."
WEIGHTS_HELP = ("Local backbone weights (.safetensors/.npz/.pth) for offline use. Default: the file the "
                "task was trained with, if it still exists, else timm's hub download.")
JSON_HELP = "Print the result as JSON on stdout (progress still goes to stderr)."
QUIET_HELP = "No progress bars or per-epoch lines."
DEVICE_HELP = "auto picks cuda, then mps, then cpu."
WORKERS_HELP = f"Image decoding processes. {_default('auto')}"

# Options that `train` and `sweep` share, declared once. A None default means "not given": the
# YAML config (or the config dataclass default shown in the help) applies.
DataArg = Annotated[Path, typer.Argument(
    help="Folder of class folders (DATA/<class>/<image>, or train/ and val/ splits of them), a .csv of "
    "path,label[,split], or a folder of VTAB-1k lists (train800.txt ...) or FGVC JSON (train.json ...).")]
DataFormatOpt = Annotated[Optional[DataFormat], typer.Option(
    "--data-format", help=f"How to read DATA; auto picks by the files there. {_default(_DEFAULTS.data.format)}")]
TrainvalOpt = Annotated[Optional[bool], typer.Option(
    "--trainval/--no-trainval", help="List formats: train on train+val (VTAB's train800val200) and score on test, "
    f"the paper's final retrain. {_default(_DEFAULTS.data.trainval)}")]
BalanceOpt = Annotated[Optional[Balance], typer.Option(
    "--balance", help="Unequal class counts: reweight (inverse-frequency loss weights), resample (class-balanced "
    f"batches), logit-adjust (Menon et al. 2021, see --tau). {_default(_DEFAULTS.train.balance)}")]
TauOpt = Annotated[Optional[float], typer.Option(
    "--tau", help=f"Strength of --balance logit-adjust: logits + tau * log(class prior). {_default(_DEFAULTS.train.tau)}")]
ShotsOpt = Annotated[Optional[int], typer.Option(
    "--shots", help=f"Keep K training images per class, drawn per class with --seed. {_default('all')}")]
TaskNameOpt = Annotated[Optional[str], typer.Option(
    "--task", "-t", help="Name to save the task under (default: the folder's name), or a .safetensors path.")]
BackboneOpt = Annotated[Optional[str], typer.Option(
    help=f"timm model name with pretrained tag. {_default(_DEFAULTS.backbone.name)}")]
BackboneWeightsOpt = Annotated[Optional[Path], typer.Option(
    help="Local backbone weights (.safetensors/.npz/.pth) instead of the hub download.")]
BackboneArgOpt = Annotated[List[str], typer.Option(
    help="Extra timm constructor argument KEY=VALUE (repeatable), e.g. depth=2.")]
ImgSizeOpt = Annotated[Optional[int], typer.Option(
    help="Input size in pixels (default: the backbone's); position embeddings are resampled.")]
EpochsOpt = Annotated[Optional[int], typer.Option(help=f"Training epochs. {_default(_DEFAULTS.train.epochs)}")]
SeedOpt = Annotated[Optional[int], typer.Option(
    help=f"Seed for init, split and shuffling. {_default(_DEFAULTS.train.seed)}")]
TrainDeviceOpt = Annotated[Optional[Device], typer.Option(help=f"{DEVICE_HELP} {_default(_DEFAULTS.train.device)}")]
WorkersOpt = Annotated[Optional[int], typer.Option(help=WORKERS_HELP)]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML file with backbone/prompt/data/train sections; flags override it.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing task of the same name.")]
ProjectOpt = Annotated[Optional[Path], typer.Option(
    "--project", help="Parent folder of the run folder. \\[default: runs/train (runs/sweep for sweep)]")]
RunNameOpt = Annotated[Optional[str], typer.Option(
    "--name", help="Run folder name, numbered name2, name3, ... when taken. \\[default: the task name]")]
ExistOkOpt = Annotated[bool, typer.Option("--exist-ok", help="Reuse an existing run folder instead of numbering a new one.")]
TensorboardOpt = Annotated[bool, typer.Option("--tensorboard", help="Also log every epoch's scalars in the run folder for TensorBoard (needs vpt-cli[tensorboard]).")]
DevicesOpt = Annotated[Optional[str], typer.Option(
    "--devices", help="Data-parallel over several devices: GPU ids (0,1; 3, for GPU 3 alone), a GPU count (4) "
    "or cpu:N (N CPU processes); starts this command under torchrun, one process per device. "
    "--batch-size stays the global batch.")]
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)]


def _version(value: bool) -> None:
    if value:
        out.print(f"vpt-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Show the version and exit.")) -> None:
    """Visual Prompt Tuning for pretrained Vision Transformers."""


def _run(action: Callable[[], Any]) -> Any:
    """Call `action`; turn user-facing errors into one stderr line and their exit code.

    SIGTERM is turned into `Terminated` (a KeyboardInterrupt) for the call, so training stops
    and says what it saved exactly as on Ctrl-C, then exits 143."""
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    for console in (out, err):  # piped or redirected: full lines, never wrapped or cut at 80 columns
        console.width = None if console.is_terminal else _PIPE_WIDTH
    try:
        return action()
    except VPTError as exc:
        if _reports(exc):
            err.print(f"[bold red]error:[/] {safe(one_line(exc, 1000))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        if _reports(exc):
            err.print("[bold red]interrupted[/]" + (" (SIGTERM)" if isinstance(exc, Terminated) else ""))
        raise typer.Exit(getattr(exc, "exit_code", 130)) from None
    except typer.Exit:  # the --devices launcher's exit code
        raise
    except Exception as exc:
        if os.environ.get("VPT_DEBUG"):
            raise
        from vpt_cli.launch import leave_for_launcher

        if leave_for_launcher(exc):
            raise typer.Exit(1) from None
        where = f"rank {os.environ['RANK']}: " if _follower() else ""
        err.print(f"[bold red]{where}internal error:[/] {type(exc).__name__}: {safe(one_line(exc, 300))} "
                  "(set VPT_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _follower() -> bool:
    """A torchrun process other than rank 0: it computes its share; rank 0 reports and writes."""
    return os.environ.get("RANK", "0") != "0"


def _reports(exc: BaseException) -> bool:
    """Whether this process prints `exc`'s line: errors every process shares are rank 0's to say,
    and a SIGTERM the --devices launcher sent is the launcher's (it says which process died)."""
    stopped = isinstance(exc, Terminated) or getattr(exc, "exit_code", None) == Terminated.exit_code
    return not _follower() and not (stopped and os.environ.get("VPT_LAUNCHED"))


def _launch(devices: Optional[str]) -> None:
    """With --devices, run this command under torchrun instead (vpt_cli.launch) and exit with its code."""
    if devices is not None:
        from vpt_cli.launch import launch

        raise typer.Exit(launch(devices, sys.argv[1:]))


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _reporter(quiet: bool):
    from vpt_cli.progress import RichReporter

    return RichReporter(err, quiet=quiet, on_epoch=None if quiet else _print_epoch)


def _print_epoch(stats: "EpochStats") -> None:
    if stats.epoch == 1:
        err.print("[dim]each line: train loss and accuracy, val accuracy (* = the weights kept so far), lr, speed[/]")
    val = f"{stats.val_acc:.3f}" if stats.val_acc is not None else "  -  "
    mark = " [green]*[/]" if stats.is_best else ""
    err.print(
        f"epoch {stats.epoch:>3}/{stats.epochs}  loss {stats.train_loss:.4f}  train {stats.train_acc:.3f}  "
        f"val {val}{mark}  lr {stats.lr:.2e}  {stats.images_per_sec:.1f} img/s  {stats.seconds:.1f}s",
        highlight=False,
    )


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


def _value(choice: Optional[Enum]) -> Optional[str]:
    return choice.value if choice else None


def _common_overrides(*, data: Path, backbone: Optional[str], backbone_weights: Optional[Path],
                      backbone_arg: list[str], img_size: Optional[int], method: Optional[Enum], epochs: Optional[int],
                      seed: Optional[int], device: Optional[Enum], workers: Optional[int],
                      data_format: Optional[Enum], trainval: Optional[bool], shots: Optional[int],
                      balance: Optional[Enum], tau: Optional[float]) -> dict[str, Any]:
    """Config overrides from the options `train` and `sweep` share (None: not given, YAML wins)."""
    return {
        "data.path": str(data), "backbone.name": backbone, "backbone.weights": _path(backbone_weights),
        "backbone.img_size": img_size, "backbone.kwargs": _parse_backbone_args(backbone_arg) or None,
        "prompt.method": _value(method), "train.epochs": epochs, "train.seed": seed, "train.device": _value(device),
        "data.workers": workers, "data.format": _value(data_format), "data.trainval": trainval, "data.shots": shots,
        "train.balance": _value(balance), "train.tau": tau,
    }


def _print_json(payload: Any) -> None:
    sys.stdout.write(strict_json(payload))


def _predictions_csv(result: Any) -> str:
    """One row per (image, task, rank); the columns never change with the number of tasks."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "task", "rank", "class", "prob"])
    for prediction in result.predictions:
        for rank, (name, prob) in enumerate(prediction.top, 1):
            writer.writerow([printable(prediction.file), prediction.task, rank, printable(name), f"{prob:.6f}"])
    return buffer.getvalue()


def _write_output(path: Path, text: str) -> None:
    from vpt_cli.fileio import write_text

    try:
        write_text(path, text)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


@app.command()
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
    method: Annotated[Optional[Method], typer.Option(help="vpt-deep: prompts at every layer; vpt-shallow: first layer only; linear: head only; full: fine-tune everything. " + _default(_DEFAULTS.prompt.method))] = None,
    prompts: Annotated[Optional[int], typer.Option("--prompts", help=f"Prompt tokens per layer. {_default(f'auto, {AUTO_PROMPT_FRACTION:.0%} of the patch tokens and at least 1: 10 at 224 px with 16 px patches, 1 at 56 px with 14 px')}")] = None,
    prompt_dropout: Annotated[Optional[float], typer.Option(help=f"Dropout on prompt tokens. {_default(f'{DEEP_PROMPT_DROPOUT} deep, 0.0 shallow')}")] = None,
    prompt_init: Annotated[Optional[PromptInit], typer.Option(help=f"How prompts start: tokens (patch tokens the frozen backbone sees at each layer, from {TOKEN_INIT_IMAGES} training images) or uniform (the paper's random init). {_default(_DEFAULTS.prompt.init)}")] = None,
    pool: Annotated[Optional[Pool], typer.Option(help=f"How the last layer becomes features: token (the CLS output), avg (the mean of every token after the prefix, prompts included, then fc_norm; MAE and MoCo v3 in the paper), avg-patches or avg-prompts (the mean of those only). {_default(_DEFAULT_POOL)}")] = None,
    epochs: EpochsOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Images per step. {_default(_DEFAULTS.train.batch_size)}")] = None,
    optimizer: Annotated[Optional[Optimizer], typer.Option(help=f"adamw (tuned for small folders) or sgd (the paper's recipe). {_default(_DEFAULTS.train.optimizer)}")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Prompt learning rate. {_default(f'{ADAMW_PROMPT_LR:g} adamw; {SGD_BASE_LR:g}*batch/256 sgd')}")] = None,
    head_lr: Annotated[Optional[float], typer.Option(help=f"Head learning rate. {_default(f'{ADAMW_HEAD_LR:g} adamw; = --lr sgd')}")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=f"Weight decay (head; all but head bias with sgd). {_default(f'{_DEFAULTS.train.weight_decay:g}')}")] = None,
    val_split: Annotated[Optional[float], typer.Option(help=f"Stratified held-out fraction when DATA has no val/ folder. {_default(_DEFAULTS.data.val_split)}")] = None,
    augment: Annotated[Optional[Augment], typer.Option(help=f"none, flip, or crop (random resized crop + flip). {_default(_DEFAULTS.data.augment)}")] = None,
    select: Annotated[Optional[Select], typer.Option(help=f"Which epoch becomes the task: best (on val, the probe's start included), last, or auto: best when val has at least {MIN_VAL_PER_CLASS_TO_SELECT} images per class, else last. {_default(_DEFAULTS.train.select)}")] = None,
    patience: Annotated[Optional[int], typer.Option(help=f"Stop after this many epochs without val improvement (0: never; only when the best epoch is kept). {_default(_DEFAULTS.train.patience)}")] = None,
    seed: SeedOpt = None,
    device: TrainDeviceOpt = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help=f"Mixed precision (bf16, or fp16 on GPUs without bf16). {_default(_DEFAULTS.train.amp)}")] = None,
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

        _launch(devices)
        overrides = _common_overrides(data=data, backbone=backbone, backbone_weights=backbone_weights,
                                      backbone_arg=backbone_arg, img_size=img_size, method=method, epochs=epochs,
                                      seed=seed, device=device, workers=workers, data_format=data_format,
                                      trainval=trainval, shots=shots, balance=balance, tau=tau)
        overrides.update({
            "prompt.num_prompts": prompts, "prompt.dropout": prompt_dropout, "prompt.init": _value(prompt_init),
            "prompt.pool": _value(pool),
            "train.batch_size": batch_size,
            "train.optimizer": _value(optimizer), "train.lr": lr, "train.head_lr": head_lr,
            "train.weight_decay": weight_decay, "data.val_split": val_split, "data.augment": _value(augment),
            "train.select": _value(select), "train.patience": patience, "train.amp": amp,
        })
        run_folder = _run_folder(project, name, exist_ok, "runs/train", tensorboard)
        if resume:  # every setting comes from the checkpoint; the flags given may only extend or move it
            if config is not None:
                raise UsageError("--resume takes its settings from the run's checkpoint; drop --config")
            result = api.resume(task, overrides, folder=run_folder, reporter=_reporter(quiet))
        else:
            result = api.train(load_config(config, overrides), task=task, force=force, reporter=_reporter(quiet),
                               folder=run_folder)
        if _follower():
            return
        if as_json:
            _print_json(result.to_dict())
            return
        from vpt_cli.render import render_train

        render_train(out, result)

    _run(action)


def _floats(text: str, flag: str) -> list[float]:
    """'1e-3,3e-3' -> [0.001, 0.003]; a bad item is a usage error naming the flag."""
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, not '{text}'") from None


def _csv(values: tuple[float, ...]) -> str:
    return ",".join(f"{value:g}" for value in values)


@app.command()
def sweep(
    data: DataArg,
    task: TaskNameOpt = None,
    lr: Annotated[str, typer.Option("--lr", help="Prompt learning rates to try, comma-separated.")] = _csv(_SWEEP.lrs),
    weight_decay: Annotated[str, typer.Option("--weight-decay", help="Weight decays to try, comma-separated.")] = _csv(_SWEEP.weight_decays),
    prompts: Annotated[str, typer.Option("--prompts", help=f"Prompt lengths to try, comma-separated (e.g. 5,10,50). {_default('the config' + chr(39) + 's, auto')}")] = "",
    budget: Annotated[Optional[str], typer.Option("--budget", help=f"At most this many trials (12) or this much time (15m, 90s, 1h). {_default('the whole grid')}")] = _SWEEP.budget,
    eta: Annotated[int, typer.Option("--eta", help="Successive halving: after each rung only the best 1/eta of the trials go on.")] = _SWEEP.eta,
    method: Annotated[Optional[Method], typer.Option(help=f"vpt-deep or vpt-shallow. {_default(_DEFAULTS.prompt.method)}")] = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"Epochs of a trial that survives every rung. {_default(_DEFAULTS.train.epochs)}")] = None,
    backbone: BackboneOpt = None,
    backbone_weights: BackboneWeightsOpt = None,
    backbone_arg: BackboneArgOpt = [],
    img_size: ImgSizeOpt = None,
    data_format: DataFormatOpt = None,
    shots: ShotsOpt = None,
    balance: BalanceOpt = None,
    tau: TauOpt = None,
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
        from vpt_cli.config import load_config
        from vpt_cli.render import LiveSweepTable, render_sweep

        overrides = _common_overrides(data=data, backbone=backbone, backbone_weights=backbone_weights,
                                      backbone_arg=backbone_arg, img_size=img_size, method=method, epochs=epochs,
                                      seed=seed, device=device, workers=workers, data_format=data_format,
                                      trainval=None, shots=shots, balance=balance, tau=tau)
        run_config = load_config(config, overrides)
        lengths = [int(v) for v in _floats(prompts, "--prompts")] or [run_config.prompt.num_prompts]
        with LiveSweepTable(err, quiet=quiet) as live:
            result = api.sweep(run_config, _floats(lr, "--lr"), _floats(weight_decay, "--weight-decay"), lengths,
                               eta=eta, budget=budget, task=task, force=force, reporter=live,
                               folder=_run_folder(project, name, exist_ok, "runs/sweep"))
        if as_json:
            _print_json(result.to_dict())
        else:
            render_sweep(out, result)

    _run(action)


@app.command("eval")
def evaluate(
    data: Path = typer.Argument(..., help="Folder of class folders to evaluate on (e.g. DATA/test), or any source "
                                "vpt train reads (with --split)."),
    task: str = typer.Option(..., "--task", "-t", help=TASK_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="Split to score: a folder DATA/<split>, or a list "
                                        "format's train/val/trainval/test. \\[default: DATA itself for folders; test, else val for lists]"),
    data_format: DataFormat = typer.Option(DataFormat.auto, "--data-format", help="How to read DATA."),
    backbone_weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    device: Device = typer.Option(Device.auto, help=DEVICE_HELP),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="Mixed precision inference."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    output_dir: Optional[Path] = typer.Option(None, help="Folder for report.html, metrics.json, predictions.csv and the pictures. \\[default: runs/eval/<task>, numbered <task>2, ... instead of overwriting]"),
    devices: DevicesOpt = None,
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Evaluate a task: top-1/top-5, per-class precision/recall/F1, balanced accuracy, confusion matrix."""

    def action() -> None:
        from vpt_cli import api

        _launch(devices)
        result = api.evaluate(data, task, _path(backbone_weights), batch_size, device.value, workers, amp,
                              output_dir, _reporter(quiet), split=split, data_format=data_format.value)
        if _follower():
            return
        if as_json:
            _print_json(result.to_dict())
            return
        from vpt_cli.render import render_eval

        render_eval(out, result)

    _run(action)


@app.command()
def predict(
    images: Optional[List[str]] = typer.Argument(None, help="Image files, folders (searched recursively) or glob patterns."),
    task: List[str] = typer.Option([], "--task", "-t", help=TASK_HELP + " Repeat to answer several tasks for every image in shared batches (same backbone)."),
    tasks_from: Optional[Path] = typer.Option(None, "--tasks-from", help="CSV with 'image' and 'task' columns: which tasks to answer for which image (instead of IMAGES and --task); image paths are relative to the CSV."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="Classes to show per image and task."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, json or csv (columns file,task,rank,class,prob)."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the predictions to this file instead of stdout (json or csv: --format, else the file's suffix)."),
    save_dir: Optional[Path] = typer.Option(None, "--save-dir", help="Also write each image with its top-k labels drawn above it (PNG) into this folder."),
    force: ForceOpt = False,
    backbone_weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    batch_size: Optional[int] = typer.Option(None, help="(image, task) pairs per forward pass. \\[default: auto]"),
    device: Device = typer.Option(Device.auto, help=DEVICE_HELP),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="Mixed precision inference."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    devices: DevicesOpt = None,
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Predict the classes of images for one or more tasks. Exits non-zero only if no input could be read.

    Example: [bold]vpt predict photos/ --task birds --task cars --format csv[/]
    """

    def action() -> None:
        from vpt_cli import api

        _launch(devices)
        if tasks_from is None and not (images and task):
            raise UsageError("give IMAGES and at least one --task, or --tasks-from FILE.csv")
        if batch_size is not None and batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        fmt = OutputFormat.json if as_json else output_format
        if output is not None and fmt is OutputFormat.table:
            fmt = OutputFormat.json if output.suffix.lower() == ".json" else OutputFormat.csv
        if output is not None and output.exists() and not force:
            raise UsageError(f"{output} exists; pass --force to overwrite it")
        result = api.predict(images or [], task, top_k, _path(backbone_weights), batch_size, device.value, workers, amp,
                             _reporter(quiet or fmt is not OutputFormat.table), tasks_from=tasks_from)
        if _follower():
            return
        for file, reason in result.failures:
            err.print(f"[yellow]skipped[/] {safe(file)}: {safe(reason)}", highlight=False)
        several = len(result.tasks) > 1
        if fmt is OutputFormat.table:
            from vpt_cli.render import render_predictions

            render_predictions(out, result)
        else:
            text = strict_json(result.to_dict()) if fmt is OutputFormat.json else _predictions_csv(result)
            if output is None:
                sys.stdout.write(text)
            else:
                _write_output(output, text)
        if save_dir is not None:
            written = api.save_labelled_images(result, save_dir, force=force)
            err.print(f"{len(written)} labelled images in {safe(save_dir)}", highlight=False)
        if not quiet:
            tasks_note = f" x {len(result.tasks)} tasks ({len(result.predictions)} answers)" if several else ""
            err.print(f"{result.num_images} images{tasks_note}, {result.images_per_sec:.1f} img/s", highlight=False)

    _run(action)


@app.command()
def export(
    task: List[str] = typer.Option(..., "--task", "-t", help=TASK_HELP + " Repeat for a multi-task bundle (inputs images + task_index)."),
    output_format: ExportFormat = typer.Option(ExportFormat.onnx, "--format", "-f", help="onnx (dynamic batch) or torchscript."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write. \\[default: <task>.onnx or <task>.pt in the current folder]"),
    backbone_weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
    dynamic_size: bool = typer.Option(False, "--dynamic-size", help="ONNX input of any height and width (multiples of the patch size; plain ViT backbones): position embeddings are resampled in the graph."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Export backbone + prompts + head as one file, checked against the eager model (max diff 1e-4).

    With several --task options, one bundle serves them all: the backbone once, every task's
    prompts and heads stacked, and a second input `task_index` (int64, one per image).
    """

    def action() -> None:
        from vpt_cli import api

        result = api.export(task, output_format.value, output, _path(backbone_weights), dynamic_size=dynamic_size)
        payload = {"path": str(result.path), "format": result.format, "tasks": task,
                   "max_abs_diff": result.max_abs_diff, "checked_with": result.checked_with,
                   "size_bytes": result.size_bytes}
        if as_json:
            _print_json(payload)
            return
        diff = f"max |diff| {result.max_abs_diff:.2e}" if result.max_abs_diff is not None else "unchecked"
        out.print(f"[green]exported[/] {safe(result.path)} ({result.size_bytes / 1e6:.1f} MB, {result.format}; "
                  f"{diff} vs eager, {result.checked_with})", highlight=False)

    _run(action)


tasks_app = typer.Typer(help="List and manage the task registry ($VPT_HOME/tasks). Without a subcommand: list.",
                        no_args_is_help=False)
app.add_typer(tasks_app, name="tasks")


def _task_row(entry: Any) -> dict[str, Any]:
    """One registry entry as JSON: the checked metadata's summary, or why the file is unusable."""
    row = {"name": entry.name, "path": str(entry.path), "size_bytes": entry.path.stat().st_size}
    if entry.info is None:
        return {**row, "error": entry.error}
    info = entry.info
    return {**row, "method": info.prompt.get("method"), "prompts": info.prompt.get("num_prompts"),
            "backbone": info.backbone, "img_size": info.img_size, "classes": info.classes,
            "metrics": info.metrics, "created": info.provenance.get("created")}


@tasks_app.callback(invoke_without_command=True)
def tasks(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the tasks in the registry: name, method, backbone, image size, classes, val top-1, size, created.

    Tasks answer together in one `vpt predict` only when backbone and image size match."""
    if ctx.invoked_subcommand is not None:
        return

    def action() -> None:
        from vpt_cli.artifact import list_tasks
        from vpt_cli.home import tasks_dir

        entries = list_tasks()
        if as_json:
            _print_json([_task_row(entry) for entry in entries])
            return
        from vpt_cli.render import render_tasks

        render_tasks(out, entries, tasks_dir())

    _run(action)


@tasks_app.command("show")
def tasks_show(name: Annotated[str, typer.Argument(help=TASK_HELP)], as_json: JsonOpt = False) -> None:
    """Everything a task file says about itself: backbone, prompts, classes, metrics, provenance."""

    def action() -> None:
        from dataclasses import asdict

        from vpt_cli.artifact import read_task_info
        from vpt_cli.home import resolve_task_path

        path = resolve_task_path(name)
        info = read_task_info(path)
        payload = {"path": str(path), "size_bytes": path.stat().st_size, **asdict(info)}
        if as_json:
            _print_json(payload)
            return
        from vpt_cli.render import render_task_info

        render_task_info(out, path, info)

    _run(action)


@tasks_app.command("rm")
def tasks_rm(name: Annotated[str, typer.Argument(help="Registry name of the task to delete.")]) -> None:
    """Delete a task from the registry (its run folder is kept)."""

    def action() -> None:
        from vpt_cli.artifact import remove_task

        err.print(f"removed {safe(remove_task(name))}", highlight=False)

    _run(action)


@tasks_app.command("mv")
def tasks_mv(old: Annotated[str, typer.Argument(help="Current registry name.")],
             new: Annotated[str, typer.Argument(help="New registry name.")], force: ForceOpt = False) -> None:
    """Rename a task in the registry (the registry name is the file name)."""

    def action() -> None:
        from vpt_cli.artifact import rename_task

        err.print(f"renamed {safe(old)} -> {safe(rename_task(old, new, force=force))}", highlight=False)

    _run(action)


@tasks_app.command("import")
def tasks_import(file: Annotated[Path, typer.Argument(help="A .safetensors task file, e.g. one you were sent.")],
                 name: Annotated[Optional[str], typer.Option("--name", "-n", help="Registry name. \\[default: the file's stem]")] = None,
                 force: ForceOpt = False) -> None:
    """Check a task file completely (metadata and tensors), then copy it into the registry."""

    def action() -> None:
        from vpt_cli.artifact import import_task

        err.print(f"imported {safe(file)} -> {safe(import_task(file, name, force=force))}", highlight=False)

    _run(action)


def _run_folder(project: Optional[Path], name: Optional[str], exist_ok: bool, default: str,
                tensorboard: bool = False) -> Any:
    from vpt_cli.training import RunFolder

    return RunFolder(project=project or default, name=name, exist_ok=exist_ok, tensorboard=tensorboard)


def _path(value: Optional[Path]) -> Optional[str]:
    return str(value) if value else None
