"""Options are defined once: each config setting's flag, help and shown default come from its
field's metadata, and the flag maps back to the setting's dotted key."""
from __future__ import annotations

import re
from dataclasses import fields

import pytest
from typer.testing import CliRunner

from vpt_cli.cli.app import app
from vpt_cli.cli.options import CONFIG_FIELDS, FLAGGED, config_overrides, with_config_options
from vpt_cli.cli.train import SWEEP_KEYS
from vpt_cli.config import RunConfig
from vpt_cli.config.fields import shown_default

runner = CliRunner()
COMMANDS = [["--help"], ["train", "--help"], ["sweep", "--help"], ["eval", "--help"], ["predict", "--help"],
            ["export", "--help"], ["tasks", "--help"], ["tasks", "show", "--help"]]


def _help(args: list[str]) -> str:
    result = runner.invoke(app, args, env={"COLUMNS": "500", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return re.sub(r"\s+", " ", result.output)


def test_every_setting_has_help_and_every_flag_is_unique():
    flags = []
    for key, (item, _) in CONFIG_FIELDS.items():
        assert item.metadata.get("help"), f"{key} has no help"
        if item.metadata.get("flag"):
            flags.extend(item.metadata["flag"].split("/"))
    assert len(flags) == len(set(flags))
    assert set(CONFIG_FIELDS) == {f"{s.name}.{f.name}" for s in fields(RunConfig) for f in fields(s.default_factory)}


@pytest.mark.parametrize("command, keys", [("train", FLAGGED), ("sweep", SWEEP_KEYS)])
def test_help_shows_each_setting_flag_help_and_default_from_the_field(command, keys):
    text = _help([command, "--help"])
    for key in keys:
        item = CONFIG_FIELDS[key][0]
        flag = item.metadata["flag"].split("/")[0]
        words = re.sub(r"\s+", " ", item.metadata["help"])
        assert f"{flag} " in text and words in text, key
        assert f"[default: {shown_default(item)}]" in text, key


def test_sweep_does_not_offer_what_it_searches_as_single_values():
    assert "train.lr" not in SWEEP_KEYS and "prompt.num_prompts" not in SWEEP_KEYS
    assert "data.trainval" not in SWEEP_KEYS and "train.batch_size" in SWEEP_KEYS


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_flags_read_as_flags(args):
    """No `<bool>` after --json, --help, --version, --force, --dynamic-size ...: they take no value."""
    assert "<bool>" not in _help(args)


def test_flags_map_back_to_dotted_keys():
    seen = {}

    @with_config_options("train.lr", "prompt.method", "backbone.kwargs", "data.trainval", "backbone.weights")
    def command(data: str, overrides=None):
        seen.update(config_overrides(overrides), data=data)

    import typer

    little = typer.Typer()
    little.command()(command)
    result = runner.invoke(little, ["d", "--lr", "0.5", "--method", "linear", "--backbone-arg", "depth=2",
                                    "--backbone-arg", "qkv_bias=false", "--trainval", "--backbone-weights", "w.pt"])
    assert result.exit_code == 0, result.output
    assert seen == {"data": "d", "train.lr": 0.5, "prompt.method": "linear",
                    "backbone.kwargs": {"depth": 2, "qkv_bias": False}, "data.trainval": True,
                    "backbone.weights": "w.pt"}
    seen.clear()
    assert runner.invoke(little, ["d"]).exit_code == 0
    assert all(value is None for key, value in seen.items() if key != "data")  # not given: YAML/defaults apply
    bad = runner.invoke(app, ["train", "d", "--backbone-arg", "depth"])
    assert bad.exit_code == 2 and "--backbone-arg expects KEY=VALUE, got 'depth'" in bad.output
    assert "Traceback" not in bad.output
