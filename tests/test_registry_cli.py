"""`vpt tasks` and its subcommands: list, show, rm, mv, import; the registry name is the file name."""
from __future__ import annotations

import json

from test_artifact import make_task
from typer.testing import CliRunner

from vpt_cli.artifact.home import tasks_dir
from vpt_cli.artifact.schema import save_task
from vpt_cli.cli.app import app

runner = CliRunner()


def vpt(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_list_show_mv_rm_import(tmp_path, isolated_home):
    save_task(make_task("birds"), tasks_dir() / "birds.safetensors")
    save_task(make_task("birds"), tmp_path / "copy.safetensors")  # same metadata name, another file
    code, _, stderr = vpt("tasks", "import", tmp_path / "copy.safetensors", "--name", "birds2")
    assert code == 0, stderr
    code, stdout, _ = vpt("tasks", "--json")
    rows = json.loads(stdout)
    assert [row["name"] for row in rows] == ["birds", "birds2"]  # file names, not the metadata's
    assert rows[0]["img_size"] == 32 and rows[0]["method"] == "vpt-deep"
    code, stdout, _ = vpt("tasks")
    assert code == 0 and "img size" in stdout and "birds2" in stdout

    code, stdout, _ = vpt("tasks", "show", "birds", "--json")
    assert code == 0 and json.loads(stdout)["classes"] == ["a", "b"]
    code, stdout, _ = vpt("tasks", "show", "birds")
    assert code == 0 and "vpt-deep, 2 prompts" in stdout

    assert vpt("tasks", "mv", "birds2", "birds")[0] == 5  # exists: needs --force
    assert vpt("tasks", "mv", "birds2", "owls")[0] == 0
    assert sorted(p.name for p in tasks_dir().iterdir()) == ["birds.safetensors", "owls.safetensors"]
    assert vpt("tasks", "rm", "owls")[0] == 0
    assert vpt("tasks", "rm", "owls")[0] == 5
    assert vpt("tasks", "mv", "birds", "bad name")[0] == 2


def test_import_refuses_an_invalid_file_and_leaves_the_registry_alone(tmp_path, isolated_home):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    code, _, stderr = vpt("tasks", "import", bad)
    assert code == 5 and "not a readable task file" in stderr
    assert not tasks_dir().exists() or not any(tasks_dir().iterdir())
