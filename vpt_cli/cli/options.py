"""Options, declared once. Every config setting's option is generated from its field's metadata
(flag, help, choices, shown default: vpt_cli.config.fields) by `with_config_options`, which also
maps the flags back to dotted config keys; the options that are no config setting (task name,
--json, run folder, ...) are declared here once for every command that takes them."""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import Field, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import typer

from vpt_cli.config import DATA_FORMATS, DEVICES, RunConfig
from vpt_cli.config.fields import shown_default
from vpt_cli.core.errors import UsageError


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum for Typer built from a tuple of choices, so each choice list is defined once."""
    return Enum(name, [(value, value) for value in values], type=str)


def default_note(text: Any) -> str:
    """A help suffix showing a default; the bracket is escaped so rich markup does not eat it."""
    return f"\\[default: {text}]"


def _config_fields() -> dict[str, tuple[Field, Any]]:
    """Every setting of RunConfig by dotted key, with its resolved type."""
    found = {}
    for section in fields(RunConfig):
        kind = section.default_factory
        hints = typing.get_type_hints(kind)
        for item in fields(kind):
            found[f"{section.name}.{item.name}"] = (item, hints[item.name])
    return found


CONFIG_FIELDS = _config_fields()
FLAGGED = tuple(key for key, (item, _) in CONFIG_FIELDS.items() if item.metadata.get("flag"))


def _option_type(key: str, item: Field, hint: Any) -> Any:
    """What Typer parses the flag into: a choice Enum, a Path, KEY=VALUE strings, or the field's type."""
    meta = item.metadata
    if meta.get("choices"):
        return choices(key.replace(".", "_"), meta["choices"])
    if meta.get("path"):
        return Path
    if typing.get_origin(hint) is dict:
        return List[str]
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return options[0] if options else hint


def _parameter(key: str) -> inspect.Parameter:
    item, hint = CONFIG_FIELDS[key]
    help_text = f"{item.metadata['help']} {default_note(shown_default(item))}"
    kind = _option_type(key, item, hint)
    option = typer.Option(*item.metadata["flag"].split(" "), help=help_text, show_default=False,
                          metavar="KEY=VALUE" if kind is List[str] else None)
    return inspect.Parameter(key.replace(".", "__"), inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


def config_overrides(given: dict[str, Any]) -> dict[str, Any]:
    """The parsed flags of `with_config_options` as config values, {dotted key: value}; called
    inside the command, so that a bad value ends in its one-line error."""
    return {key: _config_value(key, value) for key, value in given.items()}


def _config_value(key: str, value: Any) -> Any:
    """A parsed flag as the config holds it (None: not given, the YAML or default applies)."""
    if value is None:
        return None
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if typing.get_origin(CONFIG_FIELDS[key][1]) is dict:
        return parse_key_values(value, CONFIG_FIELDS[key][0].metadata["flag"]) or None
    return value


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """`--backbone-arg depth=2` -> {"depth": 2}; values are parsed as YAML scalars."""
    import yaml

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got '{item}'")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def with_config_options(*keys: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per config key (generated from the field's metadata, placed after
    its arguments and --task); the command gets them as `overrides`, {dotted key: flag value, None =
    not given}, which `config_overrides` turns into config values."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "overrides"]
        arguments = [p for p in own if p.default is inspect.Parameter.empty or p.name == "task"]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in arguments]
        generated = [_parameter(key) for key in keys]

        @functools.wraps(command)
        def wrapper(**given: Any) -> Any:
            overrides = {key: given.pop(key.replace(".", "__")) for key in keys}
            return command(overrides=overrides, **given)

        parameters = arguments + generated + rest
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


Device = choices("Device", DEVICES)
DataFormat = choices("DataFormat", DATA_FORMATS)
OutputFormat = choices("OutputFormat", ("table", "json", "csv"))
ExportFormat = choices("ExportFormat", ("onnx", "torchscript"))

TASK_HELP = "Task name in the registry ($VPT_HOME/tasks) or path to a .safetensors task file."
WEIGHTS_HELP = ("Local backbone weights (.safetensors/.npz/.pth) for offline use. Default: the file the "
                "task was trained with, if it still exists, else timm's hub download.")
JSON_HELP = "Print the result as JSON on stdout (progress still goes to stderr)."
QUIET_HELP = "No progress bars or per-epoch lines."
DEVICE_HELP = "auto picks cuda, then mps, then cpu."
WORKERS_HELP = f"Image decoding processes. {default_note('auto')}"

DataArg = Annotated[Path, typer.Argument(
    help="Folder of class folders (DATA/<class>/<image>, or train/ and val/ splits of them), a .csv of "
    "path,label[,split], or a folder of VTAB-1k lists (train800.txt ...) or FGVC JSON (train.json ...).")]
TaskNameOpt = Annotated[Optional[str], typer.Option(
    "--task", "-t", help="Name to save the task under (default: the folder's name), or a .safetensors path.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML file with backbone/prompt/data/train sections (e.g. a run's args.yaml); flags "
    "override it.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing task of the same name.")]
ProjectOpt = Annotated[Optional[Path], typer.Option(
    "--project", help="Parent folder of the run folder. \\[default: runs/train (runs/sweep for sweep)]")]
RunNameOpt = Annotated[Optional[str], typer.Option(
    "--name", help="Run folder name, numbered name2, name3, ... when taken. \\[default: the task name]")]
ExistOkOpt = Annotated[bool, typer.Option("--exist-ok", help="Reuse an existing run folder instead of numbering a "
                                                              "new one.")]
TensorboardOpt = Annotated[bool, typer.Option("--tensorboard", help="Also log every epoch's scalars in the run folder "
                                                                     "for TensorBoard (needs vpt-cli[tensorboard]).")]
DevicesOpt = Annotated[Optional[str], typer.Option(
    "--devices", help="Data-parallel over several devices: GPU ids (0,1; 3, for GPU 3 alone), a GPU count (4) "
    "or cpu:N (N CPU processes); starts this command under torchrun, one process per device. "
    "--batch-size stays the global batch.")]
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)]
