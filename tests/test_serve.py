"""`vpt serve`: every route, limit and error, hot reload under traffic, and answers equal to `vpt predict`.

The app runs in-process (httpx over ASGI, with its lifespan), so concurrent requests really share
batches; tests/test_serve_process.py runs the real uvicorn process and its SIGTERM drain.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from conftest import SERVE_IMAGES, SERVE_TASKS, write_task_file
from PIL import Image
from typer.testing import CliRunner

from vpt_cli.cli.app import app as cli_app
from vpt_cli.config import PromptConfig
from vpt_cli.core.errors import UsageError
from vpt_cli.serving.batcher import Batcher
from vpt_cli.serving.http import create_app
from vpt_cli.serving.registry import LiveTasks
from vpt_cli.serving.runner import check_exposure
from vpt_cli.serving.settings import ServeSettings

IMAGES = SERVE_IMAGES
TASKS = SERVE_TASKS


def settings_for(served: dict, **overrides) -> ServeSettings:
    fields = dict(tasks=[str(served["folder"] / f"{name}.safetensors") for name in TASKS], device="cpu", workers=2)
    fields.update(overrides)
    return ServeSettings(**fields)


@asynccontextmanager
async def serving(settings: ServeSettings):
    """The app with its lifespan, a client over ASGI, and the app's state once ready (bounded wait)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            for _ in range(1000):
                if app.state.serve.ready or app.state.serve.failure:
                    break
                await asyncio.sleep(0.01)
            assert app.state.serve.ready, app.state.serve.failure
            yield client, app.state.serve


def run(coroutine):
    return asyncio.run(coroutine)


def upload(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (path.name, path.read_bytes(), "image/png")) for path in paths]


def assert_same_as_predict(served: dict, filename: str, answers: list[dict]) -> None:
    for answer in answers:
        expected = served["expected"][(filename, answer["task"])]
        assert [item["label"] for item in answer["top"]] == [name for name, _ in expected[: len(answer["top"])]]
        assert [item["score"] for item in answer["top"]] == pytest.approx([p for _, p in expected[: len(answer["top"])]],
                                                                          abs=1e-5)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in response.text and "/tmp" not in response.text and "/work" not in response.text
    return body["error"]


# --- answers ----------------------------------------------------------------------------------


def test_mixed_concurrent_requests_share_forwards_and_equal_vpt_predict(served):
    async def scenario():
        async with serving(settings_for(served, max_batch=64, max_wait_ms=200)) as (client, state):
            requests = [
                client.post("/v1/predict", files=upload(IMAGES[0], IMAGES[1]), data={"task": "deep3,proj2", "top_k": "5"}),
                client.post("/v1/predict", files=upload(IMAGES[2], IMAGES[3]),
                            data={"task": ["shallow5", "deep3,shallow5,proj2"]}),
                client.post("/v1/predict", json={"images": [base64.b64encode(IMAGES[4].read_bytes()).decode(),
                                                            base64.b64encode(IMAGES[5].read_bytes()).decode()],
                                                 "tasks": ["proj2"], "top_k": 2}),
                client.post("/v2/models/shallow5/infer", json={"id": "r1", "parameters": {"top_k": 3}, "inputs": [
                    {"name": "image", "shape": [1], "datatype": "BYTES",
                     "data": [base64.b64encode(IMAGES[5].read_bytes()).decode()]}]}),
            ]
            responses = await asyncio.gather(*requests)
            return responses, state.batcher.forwards

    (first, second, third, infer), forwards = run(scenario())
    for response in (first, second, third, infer):
        assert response.status_code == 200, response.text
    assert forwards == 1, "all 11 pairs of four requests and three tasks took one backbone forward"
    body = first.json()
    assert body["backbone"]["fingerprint"] == served["backbone"].fingerprint and body["version"] == 1
    assert body["timing"]["batch_size"] == 11 and body["timing"]["total_ms"] >= body["timing"]["forward_ms"] > 0
    assert [[a["task"] for a in r["answers"]] for r in body["results"]] == [["deep3", "proj2"]] * 2
    for response in (first, second, third):
        for result in response.json()["results"]:
            assert result["error"] is None
            assert_same_as_predict(served, result["filename"] or IMAGES[4 + result["index"]].name, result["answers"])
    assert [len(a["top"]) for a in third.json()["results"][0]["answers"]] == [2]
    # no top_k: each task's own answer, for a single-label task its 3 best classes (as vpt predict)
    assert [len(a["top"]) for a in second.json()["results"][1]["answers"]] == [2, 3, 3]  # deep3 has 2 classes
    assert [[a["task"] for a in r["answers"]] for r in second.json()["results"]] == [["shallow5"],
                                                                                     ["deep3", "shallow5", "proj2"]]
    outputs = {o["name"]: o for o in infer.json()["outputs"]}
    assert infer.json()["id"] == "r1" and outputs["label"]["shape"] == [1, 3] and outputs["score"]["datatype"] == "FP32"
    expected = served["expected"][(IMAGES[5].name, "shallow5")]
    assert outputs["label"]["data"] == [name for name, _ in expected]
    assert outputs["score"]["data"] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_batching_modes_and_the_wait_rule(served):
    live = LiveTasks([str(served["folder"] / f"{name}.safetensors") for name in TASKS], device="cpu")
    live.load()
    server = live.current.server
    image = server.transform(Image.open(IMAGES[0]).convert("RGB"))

    async def forwards(batching: str, max_wait_s: float, tasks: list[int]) -> tuple[int, float, list]:
        batcher = Batcher(max_batch=len(tasks), max_wait_s=max_wait_s, max_queue=64, batching=batching)
        batcher.start()
        started = time.perf_counter()
        answers = await asyncio.gather(*batcher.submit(server, [image] * len(tasks), tasks, 2))
        elapsed = time.perf_counter() - started
        await batcher.close(1.0)
        return batcher.forwards, elapsed, answers

    async def scenario():
        return {mode: await forwards(mode, 2.0 if mode == "cross-task" else 0.02, [0, 1, 2, 0])
                for mode in ("cross-task", "per-task", "none")}

    results = run(scenario())
    # A full batch leaves at once (the 2 s wait is never paid); per-task splits by task; none is one pair per forward.
    assert results["cross-task"][0] == 1 and results["cross-task"][1] < 1.5
    assert results["per-task"][0] == 3 and results["none"][0] == 4
    for answers in (results["none"][2], results["per-task"][2]):
        for alone, mixed in zip(answers, results["cross-task"][2]):
            assert [c for c, _ in alone.top] == [c for c, _ in mixed.top]
            assert [p for _, p in alone.top] == pytest.approx([p for _, p in mixed.top], abs=1e-5)
    lone_forwards, lone_elapsed, _ = run(forwards("cross-task", 0.05, [1]))
    assert lone_forwards == 1 and lone_elapsed < 1.0  # a lone pair waits at most max-wait


# --- routes -----------------------------------------------------------------------------------


def test_task_listing_v2_metadata_metrics_page_and_docs(served):
    async def scenario():
        async with serving(settings_for(served)) as (client, _):
            await client.post("/v1/predict", files=upload(IMAGES[0]), data={"task": "deep3"})
            await client.post("/v1/predict", files=upload(IMAGES[0]), data={"task": "nope"})
            paths = ["/v1/tasks", "/v2/health/live", "/v2/health/ready", "/v2", "/v2/models", "/v2/models/proj2",
                     "/v2/models/proj2/ready", "/v2/models/nope", "/metrics", "/", "/openapi.json", "/docs", "/nowhere"]
            return {path: await client.get(path) for path in paths}

    got = run(scenario())
    listing = got["/v1/tasks"].json()
    assert [t["name"] for t in listing["tasks"]] == list(TASKS)
    deep3 = listing["tasks"][0]
    assert deep3["classes"] == ["deep3-0", "deep3-1"] and deep3["method"] == "vpt-deep" and deep3["prompts"] == 3
    assert deep3["sha256"] == hashlib.sha256((served["folder"] / "deep3.safetensors").read_bytes()).hexdigest()
    assert listing["backbone"]["name"] == served["backbone"].name
    assert got["/v2/health/live"].json() == {"live": True} and got["/v2/health/ready"].json() == {"ready": True}
    assert got["/v2"].json()["name"] == "vpt-cli" and got["/v2/models"].json() == {"models": list(TASKS)}
    meta = got["/v2/models/proj2"].json()
    assert meta["inputs"][0]["datatype"] == "BYTES" and meta["versions"] == [listing["tasks"][2]["sha256"][:12]]
    assert got["/v2/models/proj2/ready"].json()["ready"] is True
    assert "deep3, shallow5, proj2" in assert_error(got["/v2/models/nope"], 404, "unknown_task")["message"]
    assert_error(got["/nowhere"], 404, "not_found")
    metrics = got["/metrics"].text
    assert 'vpt_requests_total{route="predict",status="200",task="deep3"} 1.0' in metrics
    assert 'vpt_requests_total{route="predict",status="404",task="-"} 1.0' in metrics  # "nope" is never a label
    assert 'vpt_images_total{task="deep3"} 1.0' in metrics and "vpt_loaded_tasks 3.0" in metrics
    for name in ("vpt_batch_size_bucket", "vpt_queue_depth", "vpt_queue_wait_seconds_bucket", "vpt_forward_seconds_sum"):
        assert name in metrics
    page = got["/"].text
    assert "<title>vpt serve</title>" in page and "http://" not in page and "https://" not in page
    assert "default-src 'self'" in got["/"].headers["content-security-policy"]
    assert got["/docs"].status_code == 200
    schemas = got["/openapi.json"].json()["components"]["schemas"]
    undocumented = [f"{name}.{field}" for name, schema in schemas.items() if not name.startswith(("HTTP", "Validation"))
                    for field, spec in schema.get("properties", {}).items() if not spec.get("description")]
    assert not undocumented and "PredictAnswer" in schemas and "InferRequest" in schemas
    predict_body = got["/openapi.json"].json()["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(predict_body) == {"multipart/form-data", "application/json"}


# --- limits and bad input ---------------------------------------------------------------------


def test_bad_input_is_a_clear_error_and_good_images_still_answer(served, monkeypatch):
    good = base64.b64encode(IMAGES[0].read_bytes()).decode()

    async def scenario():
        async with serving(settings_for(served, max_images=2)) as (client, _):
            post = client.post
            return {
                "partly": await post("/v1/predict", files=[*upload(IMAGES[0]), ("image", ("x.png", b"not an image", "image/png"))],
                                     data={"task": "deep3"}),
                "none_readable": await post("/v1/predict", files=[("image", ("x.png", b"\x89PNG garbage", "image/png"))],
                                            data={"task": "deep3"}),
                "unknown": await post("/v1/predict", files=upload(IMAGES[0]), data={"task": "deep3,birds"}),
                "too_many": await post("/v1/predict", files=upload(*IMAGES[:3]), data={"task": "deep3"}),
                "way_too_many": await post("/v1/predict", files=upload(*IMAGES[:5]), data={"task": "deep3"}),
                "too_many_json": await post("/v1/predict", json={"images": [good] * 3, "tasks": ["deep3"]}),
                "json": await post("/v1/predict", content=b"{nope", headers={"content-type": "application/json"}),
                "base64": await post("/v1/predict", json={"images": [good, "%%%"], "tasks": ["deep3"]}),
                "fields": await post("/v1/predict", json={"images": [good]}),
                "top_k": await post("/v1/predict", files=upload(IMAGES[0]), data={"task": "deep3", "top_k": "0"}),
                "no_task": await post("/v1/predict", files=upload(IMAGES[0])),
                "task_count": await post("/v1/predict", files=upload(*IMAGES[:2]),
                                         data={"task": ["deep3"] * 3}),
                "no_image": await post("/v1/predict", data={"task": "deep3"},
                                       files=[("other", ("a.txt", b"x", "text/plain"))]),
                "path_not_file": await post("/v1/predict", data={"task": "deep3", "image": "/etc/passwd"},
                                            files=[("other", ("a.txt", b"x", "text/plain"))]),
                "media": await post("/v1/predict", content=b"raw", headers={"content-type": "image/png"}),
                "infer_bad": await post("/v2/models/deep3/infer", json={"inputs": [
                    {"name": "i", "shape": [2], "datatype": "BYTES", "data": [good, base64.b64encode(b"junk").decode()]}]}),
                "infer_fp32": await post("/v2/models/deep3/infer", json={"inputs": [
                    {"name": "i", "shape": [1], "datatype": "FP32", "data": ["1"]}]}),
            }

    got = run(scenario())
    partly = got["partly"].json()["results"]
    assert got["partly"].status_code == 200 and partly[0]["error"] is None and partly[0]["answers"]
    assert partly[1]["answers"] == [] and partly[1]["error"]["code"] == "undecodable_image"
    assert "not a recognised image format" in partly[1]["error"]["message"]
    assert_error(got["none_readable"], 422, "no_readable_image")
    assert "birds" in assert_error(got["unknown"], 404, "unknown_task")["message"]
    assert "--max-images" in assert_error(got["too_many"], 413, "too_many_images")["message"]
    assert_error(got["way_too_many"], 413, "too_many_images")  # refused by the multipart parser's file cap
    assert_error(got["too_many_json"], 413, "too_many_images")
    assert_error(got["json"], 400, "bad_json")
    assert "image 1" in assert_error(got["base64"], 400, "bad_base64")["message"]
    assert "tasks" in assert_error(got["fields"], 400, "bad_request")["message"]
    assert_error(got["top_k"], 400, "bad_request")
    assert_error(got["no_task"], 400, "no_task")
    assert_error(got["task_count"], 400, "bad_request")
    assert_error(got["no_image"], 400, "no_images")
    assert "never fetched" in assert_error(got["path_not_file"], 400, "bad_request")["message"]
    assert_error(got["media"], 415, "unsupported_media_type")
    assert "image 1" in assert_error(got["infer_bad"], 422, "undecodable_image")["message"]
    assert_error(got["infer_fp32"], 400, "bad_request")

    # The training decode guard caps decoded pixels here too (a decompression bomb is one bad image).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    async def bomb():
        async with serving(settings_for(served)) as (client, _):
            return await client.post("/v1/predict", files=upload(IMAGES[0], IMAGES[1]), data={"task": "deep3"})

    assert "too large" in assert_error(run(bomb()), 422, "no_readable_image")["message"]


def test_body_cap_holds_while_streaming(served):
    chunk = b"x" * 10_000
    pulled = []

    async def body():
        for _ in range(100):  # 1 MB in all, ten times the cap
            pulled.append(1)
            yield chunk

    async def scenario():
        async with serving(settings_for(served, max_body_mb=0.1)) as (client, _):
            declared = await client.post("/v1/predict", content=b"y" * 200_000,
                                         headers={"content-type": "application/json"})
            streamed = await client.post("/v1/predict", content=body(), headers={"content-type": "application/json"})
            small = await client.post("/v1/predict", files=upload(IMAGES[0]), data={"task": "deep3"})
            return declared, streamed, small

    declared, streamed, small = run(scenario())
    assert "--max-body-mb" in assert_error(declared, 413, "payload_too_large")["message"]
    assert_error(streamed, 413, "payload_too_large")
    assert len(pulled) <= 12, "the body was cut off at the cap, not read to the end"
    assert small.status_code == 200


def test_full_queue_is_503_with_retry_after_and_slow_answers_504(served):
    async def scenario():
        async with serving(settings_for(served, max_queue=3, timeout_s=0.2, max_wait_ms=0)) as (client, state):
            full = await client.post("/v1/predict", files=upload(IMAGES[0], IMAGES[1]), data={"task": "deep3,shallow5"})
            server = state.live.current.server
            real = server.logits

            def slow(*args, **kwargs):
                time.sleep(0.5)
                return real(*args, **kwargs)

            server.logits = slow
            late = await client.post("/v1/predict", files=upload(IMAGES[0]), data={"task": "deep3"})
            server.logits = real
            return full, late

    full, late = run(scenario())
    assert "at most 3" in assert_error(full, 503, "queue_full")["message"] and full.headers["retry-after"] == "1"
    assert "--timeout-s" in assert_error(late, 504, "timeout")["message"]


# --- security ---------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health_and_cors_is_off_by_default(served):
    async def scenario():
        async with serving(settings_for(served, api_key="s3cret", cors_origins=["http://example.test"])) as (client, _):
            key = {"Authorization": "Bearer s3cret"}
            got = {
                "no_key": await client.get("/v1/tasks"),
                "wrong": await client.get("/v1/tasks", headers={"Authorization": "Bearer s3cre"}),
                "basic": await client.get("/v1/tasks", headers={"Authorization": "Basic s3cret"}),
                "key": await client.get("/v1/tasks", headers=key),
                "metrics": await client.get("/metrics"),
                "admin": await client.delete("/v1/tasks/deep3"),
                "live": await client.get("/v2/health/live"),
                "ready": await client.get("/v2/health/ready"),
                "page": await client.get("/"),
                "preflight": await client.options("/v1/predict", headers={
                    "Origin": "http://example.test", "Access-Control-Request-Method": "POST"}),
            }
        async with serving(settings_for(served)) as (client, _):
            got["no_cors"] = await client.get("/v1/tasks", headers={"Origin": "http://example.test"})
        return got

    got = run(scenario())
    for name in ("no_key", "wrong", "basic", "metrics", "admin"):
        assert_error(got[name], 401, "unauthorized")
    assert got["no_key"].headers["www-authenticate"] == "Bearer"
    assert got["key"].status_code == 200
    assert got["live"].status_code == got["ready"].status_code == got["page"].status_code == 200
    assert got["preflight"].headers["access-control-allow-origin"] == "http://example.test"
    assert "access-control-allow-origin" not in got["no_cors"].headers


def test_listening_beyond_loopback_needs_a_key(served):
    with pytest.raises(UsageError, match="--api-key"):
        check_exposure("0.0.0.0", None, insecure_no_key=False)
    check_exposure("0.0.0.0", "key", insecure_no_key=False)
    check_exposure("10.1.2.3", None, insecure_no_key=True)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(host, None, insecure_no_key=False)
    task = str(served["folder"] / "deep3.safetensors")
    result = CliRunner().invoke(cli_app, ["serve", "--task", task, "--host", "0.0.0.0"], env={"VPT_API_KEY": ""})
    assert result.exit_code == 2 and "--insecure-no-key" in result.output
    assert CliRunner().invoke(cli_app, ["serve", "--task", task, "--max-wait-ms", "-1"]).exit_code == 2
    assert CliRunner().invoke(cli_app, ["serve"]).exit_code == 2


# --- tasks change without restart -------------------------------------------------------------


def test_watch_and_admin_reload_under_traffic_never_fail_a_request(served, tmp_path):
    folder = tmp_path / "registry"
    shutil.copytree(served["folder"], folder)
    backbone = served["backbone"]

    async def scenario():
        settings = settings_for(served, tasks=[], all_tasks_dir=folder, watch=True, watch_interval_s=0.1)
        async with serving(settings) as (client, state):
            seen: list[tuple[int, list]] = []
            stop = asyncio.Event()

            async def traffic():
                for _ in range(400):  # bounded; stops as soon as the changes are done
                    if stop.is_set():
                        return
                    response = await client.post("/v1/predict", files=upload(IMAGES[0]), data={"task": "deep3,shallow5"})
                    assert response.status_code == 200, response.text
                    body = response.json()
                    seen.append((body["version"], body["results"][0]["answers"][0]["top"]))

            async def wait_for(check, what: str):
                for _ in range(500):
                    listing = (await client.get("/v1/tasks")).json()
                    if check(listing):
                        return listing
                    await asyncio.sleep(0.02)
                raise AssertionError(f"the watcher never {what}")

            runners = [asyncio.create_task(traffic()) for _ in range(3)]
            await asyncio.sleep(0.05)
            write_task_file(backbone, served["weights"], PromptConfig("vpt-deep", 3), "deep3", folder, 2, seed=99)
            replaced = await wait_for(lambda l: l["tasks"][0]["sha256"] != hashlib.sha256(
                (served["folder"] / "deep3.safetensors").read_bytes()).hexdigest(), "saw deep3 replaced")
            write_task_file(backbone, served["weights"], PromptConfig("vpt-shallow", 1), "extra", folder, 5)
            await wait_for(lambda l: "extra" in [t["name"] for t in l["tasks"]], "loaded a new file")
            (folder / "proj2.safetensors").unlink()
            await wait_for(lambda l: "proj2" not in [t["name"] for t in l["tasks"]], "unloaded a removed file")
            shutil.copy(served["stranger"], folder / "stranger.safetensors")
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*runners)
            shutil.copy(served["folder"] / "proj2.safetensors", folder / "proj2.safetensors")
            # the watcher takes it back first, so it cannot load it again after the DELETE below
            await wait_for(lambda l: "proj2" in [t["name"] for t in l["tasks"]], "loaded a file put back")
            admin = {
                "reload_stranger": await client.post("/v1/tasks/stranger/reload"),
                "reload_missing": await client.post("/v1/tasks/ghost/reload"),
                "reload": await client.post("/v1/tasks/proj2/reload"),
                "delete_unknown": await client.delete("/v1/tasks/ghost"),
            }
            for name in ("shallow5", "extra", "proj2"):
                admin[f"delete_{name}"] = await client.delete(f"/v1/tasks/{name}")
            admin["delete_last"] = await client.delete("/v1/tasks/deep3")
            await asyncio.sleep(0.3)  # three looks of the watcher: an unloaded task's unchanged file stays unloaded
            admin["listing"] = await client.get("/v1/tasks")
            admin["gone"] = await client.post("/v1/predict", files=upload(IMAGES[0]), data={"task": "extra"})
            return seen, replaced, admin

    seen, replaced, admin = run(scenario())
    assert "stranger" not in [t["name"] for t in replaced["tasks"]]
    versions = sorted({version for version, _ in seen})
    assert len(versions) >= 2 and len(seen) >= 6
    # Each request is answered wholly by the version it started on: one answer per version.
    by_version = {}
    for version, top in seen:
        first = by_version.setdefault(version, top)
        assert [item["score"] for item in top] == pytest.approx([item["score"] for item in first], abs=1e-5)
    old, new = by_version[versions[0]], by_version[versions[-1]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(old, new)) > 1e-3, "the replaced deep3 answers differently"
    reason = assert_error(admin["reload_stranger"], 409, "task_refused")["message"]
    assert "different backbones" in reason and "fingerprint" in reason
    assert_error(admin["reload_missing"], 404, "unknown_task")
    assert admin["reload"].status_code == 200 and admin["reload"].json()["task"]["name"] == "proj2"
    assert_error(admin["delete_unknown"], 404, "unknown_task")
    assert all(admin[f"delete_{name}"].status_code == 200 for name in ("shallow5", "extra", "proj2"))
    assert_error(admin["delete_last"], 409, "last_task")
    assert [t["name"] for t in admin["listing"].json()["tasks"]] == ["deep3"]
    assert_error(admin["gone"], 404, "unknown_task")
    assert (folder / "extra.safetensors").is_file(), "unloading leaves the file alone"


def test_a_bad_task_at_start_is_reported_not_hung(served, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a task")

    async def scenario():
        app = create_app(settings_for(served, tasks=[str(broken)]))
        async with app.router.lifespan_context(app):
            for _ in range(500):
                if app.state.serve.failure:
                    break
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
                return app.state.serve.failure, await client.get("/v2/health/ready"), await client.get("/v1/tasks")

    failure, ready, tasks = run(scenario())
    assert failure is not None and "task" in str(failure)
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    assert_error(tasks, 503, "not_ready")


def test_serve_help_is_fast_and_shows_examples():
    result = CliRunner().invoke(cli_app, ["serve", "--help"])
    assert result.exit_code == 0
    for text in ("vpt serve --task birds", "curl -F image=@bird.jpg", "--max-body-mb", "--api-key", "--watch",
                 "--drain-timeout", "VPT_API_KEY"):
        assert text in result.output
    assert "--batching" not in result.output  # a benchmarking knob, hidden
    import subprocess
    import sys

    code = "import sys, vpt_cli.cli.app; print(sorted({'fastapi', 'uvicorn', 'torch'} & set(sys.modules)))"
    assert json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
                      .replace("'", '"')) == []
