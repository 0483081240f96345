"""Options that several commands share, declared once; their shown defaults are read from the config dataclasses."""
from __future__ import annotations

from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from vpt_cli.config import (
    AUGMENTS,
    AVG_POOLED_TAGS,
    BALANCES,
    DATA_FORMATS,
    DEVICES,
    LOSSES,
    METHODS,
    OPTIMIZERS,
    POOLS,
    PROMPT_INITS,
    SELECTS,
    RunConfig,
    SweepConfig,
)
from vpt_cli.methods import get_method


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum for Typer built from config's tuple, so each choice list is defined once."""
    return Enum(name, [(value, value) for value in values], type=str)



Method = choices("Method", METHODS)



Optimizer = choices("Optimizer", OPTIMIZERS)



Augment = choices("Augment", AUGMENTS)



Device = choices("Device", DEVICES)



Select = choices("Select", SELECTS)



DataFormat = choices("DataFormat", DATA_FORMATS)



Balance = choices("Balance", BALANCES)



PromptInit = choices("PromptInit", PROMPT_INITS)



Loss = choices("Loss", LOSSES)



Pool = choices("Pool", POOLS)



OutputFormat = choices("OutputFormat", ("table", "json", "csv"))



ExportFormat = choices("ExportFormat", ("onnx", "torchscript"))



DEFAULTS = RunConfig()



DEFAULT_POOL = DEFAULTS.prompt.pool or f"the backbone's own; avg for .{', .'.join(AVG_POOLED_TAGS)} tags"



SWEEP_DEFAULTS = SweepConfig()



def shown_default(text: Any) -> str:
    """A help suffix showing a default; the bracket is escaped so rich markup does not eat it."""
    return f"\\[default: {text}]"



TASK_HELP = "Task name in the registry ($VPT_HOME/tasks) or path to a .safetensors task file."



WEIGHTS_HELP = ("Local backbone weights (.safetensors/.npz/.pth) for offline use. Default: the file the "
                "task was trained with, if it still exists, else timm's hub download.")



JSON_HELP = "Print the result as JSON on stdout (progress still goes to stderr)."



QUIET_HELP = "No progress bars or per-epoch lines."



DEVICE_HELP = "auto picks cuda, then mps, then cpu."



WORKERS_HELP = f"Image decoding processes. {shown_default('auto')}"



# Options that `train` and `sweep` share, declared once. A None default means "not given": the
# YAML config (or the config dataclass default shown in the help) applies.
DataArg = Annotated[Path, typer.Argument(
    help="Folder of class folders (DATA/<class>/<image>, or train/ and val/ splits of them), a .csv of "
    "path,label[,split], or a folder of VTAB-1k lists (train800.txt ...) or FGVC JSON (train.json ...).")]



DataFormatOpt = Annotated[Optional[DataFormat], typer.Option(
    "--data-format", help=f"How to read DATA; auto picks by the files there. {shown_default(DEFAULTS.data.format)}")]



TrainvalOpt = Annotated[Optional[bool], typer.Option(
    "--trainval/--no-trainval", help="List formats: train on train+val (VTAB's train800val200) and score on test, "
    f"the paper's final retrain. {shown_default(DEFAULTS.data.trainval)}")]



BalanceOpt = Annotated[Optional[Balance], typer.Option(
    "--balance", help="Unequal class counts: reweight (inverse-frequency loss weights), resample (class-balanced "
    "batches), logit-adjust (Menon et al. 2021, see --tau). Multi-label tasks: any but none weighs each class's "
    f"positives by its negatives/positives ratio; resample is refused. {shown_default(DEFAULTS.train.balance)}")]



TauOpt = Annotated[Optional[float], typer.Option(
    "--tau", help=f"Strength of --balance logit-adjust: logits + tau * log(class prior). {shown_default(DEFAULTS.train.tau)}")]



ShotsOpt = Annotated[Optional[int], typer.Option(
    "--shots", help="Keep K training images per class, drawn per class with --seed (multi-label: at least K "
    f"positives per class). {shown_default('all')}")]



TaskNameOpt = Annotated[Optional[str], typer.Option(
    "--task", "-t", help="Name to save the task under (default: the folder's name), or a .safetensors path.")]



BackboneOpt = Annotated[Optional[str], typer.Option(
    help=f"timm model name with pretrained tag. {shown_default(DEFAULTS.backbone.name)}")]



BackboneWeightsOpt = Annotated[Optional[Path], typer.Option(
    help="Local backbone weights (.safetensors/.npz/.pth) instead of the hub download.")]



BackboneArgOpt = Annotated[List[str], typer.Option(
    help="Extra timm constructor argument KEY=VALUE (repeatable), e.g. depth=2.")]



ImgSizeOpt = Annotated[Optional[int], typer.Option(
    help="Input size in pixels (default: the backbone's); position embeddings are resampled.")]



EpochsOpt = Annotated[Optional[int], typer.Option(help=f"Training epochs. {shown_default(DEFAULTS.train.epochs)}")]



SeedOpt = Annotated[Optional[int], typer.Option(
    help=f"Seed for init, split and shuffling. {shown_default(DEFAULTS.train.seed)}")]



TrainDeviceOpt = Annotated[Optional[Device], typer.Option(help=f"{DEVICE_HELP} {shown_default(DEFAULTS.train.device)}")]



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



def config_option(section: str, name: str) -> Any:
    """The Typer option of a config field whose `metadata` holds its flag and help (the help shows
    the dataclass default)."""
    field = next(f for f in fields(getattr(DEFAULTS, section)) if f.name == name)
    default = getattr(getattr(DEFAULTS, section), name)
    return typer.Option(field.metadata["flag"], help=f"{field.metadata['help']} "
                        f"{shown_default(repr(default) if isinstance(default, str) else default)}")


MultiLabelOpt = Annotated[Optional[bool], config_option("data", "multi_label")]



LabelSepOpt = Annotated[Optional[str], config_option("data", "label_sep")]



LossOpt = Annotated[Optional[Loss], config_option("train", "loss")]



ThresholdOpt = Annotated[Optional[float], config_option("train", "threshold")]



JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]



QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)]


def _method_help() -> tuple[str, str]:
    """--method's help and --prompt-dropout's shown default, read from the method registry."""
    infos = [get_method(name) for name in METHODS]
    methods = "; ".join(f"{info.name}: {info.summary}" for info in infos)
    dropouts = ", ".join(f"{info.default_dropout:g} {info.name}" for info in infos if info.prompts)
    return methods + ".", dropouts


METHOD_HELP, DROPOUT_DEFAULTS = _method_help()
