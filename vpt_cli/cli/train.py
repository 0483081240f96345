"""vpt train and vpt sweep: a run's config from YAML and flags, then api.train/resume/sweep."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vpt_cli.cli.common import err, is_follower, launch_if_asked, make_reporter, out, print_json, run_command
from vpt_cli.cli.options import (
    FLAGGED,
    ConfigOpt,
    DataArg,
    DevicesOpt,
    ExistOkOpt,
    ForceOpt,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    RunNameOpt,
    TaskNameOpt,
    TensorboardOpt,
    config_overrides,
    default_note,
    with_config_options,
)
from vpt_cli.config import SweepConfig
from vpt_cli.core.errors import UsageError

# The settings a sweep searches over itself (its --lr, --weight-decay and --prompts take lists),
# or that it refuses (--trainval): every other setting is an option of both commands.
_SEARCHED = ("train.lr", "train.weight_decay", "prompt.num_prompts", "prompt.fourier_fraction", "data.trainval")
SWEEP_KEYS = tuple(key for key in FLAGGED if key not in _SEARCHED)
SWEEP_DEFAULTS = SweepConfig()


@with_config_options(*FLAGGED)
def train(
    data: DataArg,
    task: TaskNameOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of this task after its last "
                                         "finished epoch, with every setting its checkpoint holds (only --epochs, "
                                         "--device and --workers may change).")] = False,
    project: ProjectOpt = None,
    name: RunNameOpt = None,
    exist_ok: ExistOkOpt = False,
    tensorboard: TensorboardOpt = False,
    devices: DevicesOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    overrides: Optional[dict[str, Any]] = None,
) -> None:
    """Train a task on a folder of images.

    Example: [bold]vpt train ./photos --task birds --backbone-weights vit_b16.safetensors[/]
    """

    def action() -> None:
        launch_if_asked(devices)  # before the library's imports: the launcher only starts the processes
        from vpt_cli import api
        from vpt_cli.config import load_config

        given = {**config_overrides(overrides or {}), "data.path": str(data)}
        run_folder = _run_folder(project, name, exist_ok, "runs/train", tensorboard)
        if resume:  # every setting comes from the checkpoint; the flags given may only extend or move it
            if config is not None:
                raise UsageError("--resume takes its settings from the run's checkpoint; drop --config")
            result = api.resume(task, given, folder=run_folder, reporter=make_reporter(quiet))
        else:
            result = api.train(load_config(config, given), task=task, force=force, reporter=make_reporter(quiet),
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


@with_config_options(*SWEEP_KEYS)
def sweep(
    data: DataArg,
    task: TaskNameOpt = None,
    lr: Annotated[str, typer.Option("--lr", help="Prompt learning rates to try, comma-separated.")] = _csv(
        SWEEP_DEFAULTS.lrs),
    weight_decay: Annotated[str, typer.Option("--weight-decay", help="Weight decays to try, comma-separated.")] = _csv(
        SWEEP_DEFAULTS.weight_decays),
    prompts: Annotated[str, typer.Option("--prompts", help="Prompt lengths to try, comma-separated (e.g. 5,10,50). "
                                         f"{default_note('the config' + chr(39) + 's, auto')}")] = "",
    fourier_fraction: Annotated[str, typer.Option(
        "--fourier-fraction", help="vfpt: Fourier fractions to try, comma-separated (e.g. 0.25,0.5,1). "
        f"{default_note('the config' + chr(39) + 's, 0.5')}")] = "",
    budget: Annotated[Optional[str], typer.Option("--budget", help="At most this many trials (12) or this much time "
                                                  f"(15m, 90s, 1h). {default_note('the whole grid')}")] = None,
    eta: Annotated[int, typer.Option("--eta", help="Successive halving: after each rung only the best 1/eta of the "
                                     "trials go on.")] = SWEEP_DEFAULTS.eta,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    project: ProjectOpt = None,
    name: RunNameOpt = None,
    exist_ok: ExistOkOpt = False,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live table.")] = False,
    overrides: Optional[dict[str, Any]] = None,
) -> None:
    """Search lr x weight decay (x prompt length, x Fourier fraction) on the val split; keep the best trial as the task.

    Cheap trials start first; successive halving stops the weaker ones early. Every trial is
    written to sweep.csv in the task's run folder; --epochs is what a trial that survives every
    rung trains. Example: [bold]vpt sweep ./photos --budget 20m[/]
    """

    def action() -> None:
        from vpt_cli import api
        from vpt_cli.cli.live_sweep import LiveSweepTable
        from vpt_cli.cli.render import render_sweep
        from vpt_cli.config import load_config

        run_config = load_config(config, {**config_overrides(overrides or {}), "data.path": str(data)})
        lengths = [int(v) for v in _floats(prompts, "--prompts")] or [run_config.prompt.num_prompts]
        fractions = _floats(fourier_fraction, "--fourier-fraction") or [run_config.prompt.fourier_fraction]
        with LiveSweepTable(err, quiet=quiet) as live:
            result = api.sweep(run_config, _floats(lr, "--lr"), _floats(weight_decay, "--weight-decay"), lengths,
                               eta=eta, budget=budget, task=task, force=force, reporter=live,
                               folder=_run_folder(project, name, exist_ok, "runs/sweep"), fourier_fractions=fractions)
        if as_json:
            print_json(result.to_dict())
        else:
            render_sweep(out, result)

    run_command(action)


def _run_folder(project: Optional[Path], name: Optional[str], exist_ok: bool, default: str,
                tensorboard: bool = False) -> Any:
    from vpt_cli.training.run_folder import RunFolder

    return RunFolder(project=project or default, name=name, exist_ok=exist_ok, tensorboard=tensorboard)
