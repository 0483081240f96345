"""deploy/Dockerfile, deploy/kserve.yaml and the docs' `vpt serve` lines use only flags and routes that exist."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import typer
import yaml

from vpt_cli.cli.app import app as cli_app
from vpt_cli.serving.http import create_app
from vpt_cli.serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]


def serve_options() -> dict[str, bool]:
    """Every `vpt serve` option -> whether it takes a value."""
    command = typer.main.get_command(cli_app).commands["serve"]
    return {name: not param.is_flag for param in command.params for name in [*param.opts, *param.secondary_opts]}


def routes() -> set[str]:
    return {route.path for route in create_app(ServeSettings(tasks=["any"])).routes}


def check_args(args: list[str]) -> dict[str, str]:
    """Each flag is a real option, given a value when it takes one -> {flag: value}."""
    options, given, i = serve_options(), {}, 0
    while i < len(args):
        flag = args[i]
        assert flag in options, f"vpt serve has no option {flag}"
        if options[flag]:
            assert i + 1 < len(args) and not args[i + 1].startswith("--"), f"{flag} needs a value"
            given[flag] = args[i + 1]
            i += 2
        else:
            given[flag] = ""
            i += 1
    return given


def test_dockerfile_runs_vpt_serve_with_real_flags_and_probes_a_real_route():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    instructions = {line.split()[0]: line.split(None, 1)[1] for line in text.replace("\\\n", " ").splitlines()
                    if line and not line.startswith("#")}
    assert json.loads(instructions["ENTRYPOINT"]) == ["vpt", "serve"]
    given = check_args(json.loads(instructions["CMD"]))
    assert instructions["EXPOSE"] == given["--port"] and given["--host"] == "0.0.0.0"
    assert "--all-tasks" in given and "--watch" in given
    probe = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", instructions["HEALTHCHECK"])
    assert probe and probe.group(1) == given["--port"] and probe.group(2) in routes()
    assert 'pip install ".[serve]"' in text


def test_kserve_manifest_probes_real_routes_and_mounts_the_registry_read_only():
    manifest = yaml.safe_load((ROOT / "deploy" / "kserve.yaml").read_text())
    assert manifest["kind"] == "InferenceService" and manifest["apiVersion"].startswith("serving.kserve.io/")
    predictor = manifest["spec"]["predictor"]
    (container,) = predictor["containers"]
    given = check_args([str(arg) for arg in container["args"]])
    port = int(given["--port"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    known = routes()
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in known and container[probe]["httpGet"]["port"] == port
    assert {"/v2/health/ready", "/v2/health/live", "/v2/models/{task}/infer"} <= known
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts[given["--tasks-dir"]]["readOnly"] is True and "--watch" in given
    assert any(given["--backbone-weights"].startswith(path + "/") for path in mounts)
    volumes = {volume["name"]: volume for volume in predictor["volumes"]}
    assert volumes[mounts[given["--tasks-dir"]]["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert [env["name"] for env in container["env"]] == ["VPT_API_KEY"]  # listening on 0.0.0.0 needs a key
    assert predictor["terminationGracePeriodSeconds"] > float(given["--drain-timeout"])


def test_every_vpt_serve_line_in_the_docs_uses_real_flags_and_routes():
    known = routes()
    for doc in (ROOT / "README.md", ROOT / "docs" / "serving.md"):
        text = doc.read_text()
        lines = [line for line in text.replace("\\\n", " ").splitlines() if re.match(r"\s*(\$ )?vpt serve", line)]
        assert lines, f"{doc.name} shows no `vpt serve` line"
        for line in lines:
            words = shlex.split(line.split("#")[0].strip().removeprefix("$ "))[2:]
            check_args([word for word in words if not word.startswith("--") or "=" not in word])
        for path in re.findall(r"(?:localhost|127\.0\.0\.1):\d+(/[\w/.{}-]*)", text):
            route = re.sub(r"/v2/models/[\w.{}-]+", "/v2/models/{task}", path.rstrip("."))
            route = re.sub(r"/v1/tasks/[\w.{}-]+", "/v1/tasks/{name}", route)
            assert route in known | {"/"}, path
