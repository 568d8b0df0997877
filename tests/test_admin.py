"""Task management on a live server: auth, load/reload/unload, atomic swaps, paths, manifests."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import shutil

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
import torch  # noqa: E402
from conftest import tiny_bert  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from tiny_bundle import FAQ, QA, SPECS, slowed, support_model  # noqa: E402

from mtpeft.admin import API_KEY_ENV  # noqa: E402
from mtpeft.serve import ServeSettings, create_app  # noqa: E402
from mtpeft.storage import (  # noqa: E402
    ADAPTER_WEIGHTS,
    BUNDLE_FILE,
    HEAD_WEIGHTS,
    TASK_FILE,
    read_json,
    read_safetensors,
    save_task,
    write_json,
    write_safetensors,
)
from mtpeft.support import SupportPipeline  # noqa: E402

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["great service", "my parcel is late", "thanks!", "broken again", "ok I guess", "love it"]


def changed(model, task: str, seed: int):
    """``model`` with ``task``'s adapter and head moved to other random values: a "new version"."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.task_parameters(task).values():
            param.add_(torch.randn_like(param) * 0.5)
    return model


@pytest.fixture
def root(tokenizer, tmp_path):
    """An admin root: the three support tasks saved as a bundle (v1), a changed sentiment in v2/."""
    v1 = support_model(tiny_bert(tokenizer))
    v1.save(tmp_path / "bundle")
    changed(support_model(tiny_bert(tokenizer)), "sentiment", seed=1).save(tmp_path / "bundle" / "v2", tasks=["sentiment"])
    return tmp_path / "bundle"


@pytest.fixture
def served(tokenizer):
    """The served model: v1 of sentiment and similar-questions; faq-answer is not loaded."""
    model = support_model(tiny_bert(tokenizer))
    model.remove_task("faq-answer")
    return model


def probabilities(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [r["prediction"]["probabilities"] for r in response.json()["results"]]


def expected(model, task: str, texts=TEXTS) -> list[dict]:
    return [p.to_dict()["probabilities"] for p in model.predict(texts, task=task)]


def close(a: list[dict], b: list[dict], tol: float = 1e-5) -> bool:
    return all(abs(x[k] - y[k]) < tol for x, y in zip(a, b, strict=True) for k in x)


def test_off_without_a_key_and_401_with_a_wrong_one(served, root, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with TestClient(create_app(served, admin_root=root)) as c:
        response = c.delete("/v1/admin/tasks/sentiment")
        assert response.status_code == 404 and API_KEY_ENV in response.json()["detail"]
    monkeypatch.setenv(API_KEY_ENV, KEY)
    with TestClient(create_app(served, admin_root=root)) as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}, {"Authorization": KEY}):
            response = c.delete("/v1/admin/tasks/sentiment", headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["detail"], headers
        assert "sentiment" in served.specs
        assert c.post("/v1/admin/tasks/sentiment/reload", headers={"X-API-Key": KEY}).status_code == 200
        assert c.post("/v1/admin/tasks/sentiment/reload", headers=AUTH).status_code == 200


def test_load_reload_unload(tokenizer, served, root):
    v1 = support_model(tiny_bert(tokenizer))
    v2 = changed(support_model(tiny_bert(tokenizer)), "sentiment", seed=1)
    with TestClient(create_app(served, admin_root=root, api_key=KEY)) as c:
        assert c.post("/v1/predict", json={"input": QA, "task": "faq-answer"}).status_code == 422

        loaded = c.post("/v1/admin/tasks", json={"path": "faq-answer"}, headers=AUTH)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["action"] == "loaded" and loaded.json()["source"] == "faq-answer"
        assert loaded.json()["tasks"] == ["faq-answer", "sentiment", "similar-questions"]
        answer = c.post("/v1/predict", json={"input": QA, "task": "faq-answer"}).json()["results"][0]["prediction"]
        assert answer == v1.predict(QA, task="faq-answer").to_dict()
        assert {t["name"] for t in c.get("/v1/tasks").json()["tasks"]} == {"faq-answer", "sentiment", "similar-questions"}
        again = c.post("/v1/admin/tasks", json={"path": ".", "task": "faq-answer"}, headers=AUTH)
        assert again.status_code == 409 and "already loaded" in again.json()["detail"]

        body = {"inputs": TEXTS, "task": "sentiment"}
        assert close(probabilities(c.post("/v1/predict", json=body)), expected(v1, "sentiment"))
        reloaded = c.post("/v1/admin/tasks/sentiment/reload", json={"path": "v2"}, headers=AUTH)
        assert reloaded.status_code == 200 and reloaded.json()["source"] == "v2/sentiment"
        assert close(probabilities(c.post("/v1/predict", json=body)), expected(v2, "sentiment"))
        assert not close(expected(v1, "sentiment"), expected(v2, "sentiment"))
        # no body: the version saved in the admin root's bundle
        assert c.post("/v1/admin/tasks/sentiment/reload", headers=AUTH).json()["source"] == "sentiment"
        assert close(probabilities(c.post("/v1/predict", json=body)), expected(v1, "sentiment"))

        unloaded = c.delete("/v1/admin/tasks/similar-questions", headers=AUTH)
        assert unloaded.status_code == 200 and unloaded.json()["tasks"] == ["faq-answer", "sentiment"]
        gone = c.post("/v1/predict", json={"input": ["a", "b"], "task": "similar-questions"})
        assert gone.status_code == 422 and "unknown task 'similar-questions'" in gone.json()["detail"]
        assert c.get("/healthz").json()["tasks"] == 2
        assert c.delete("/v1/admin/tasks/similar-questions", headers=AUTH).status_code == 404
        assert c.post("/v1/admin/tasks/nope/reload", headers=AUTH).status_code == 404


def test_reload_is_atomic_for_requests_in_flight(tokenizer, served, root):
    """Requests racing many swaps each see the old version or the new one, whole, and never a missing task."""
    versions = [expected(support_model(tiny_bert(tokenizer)), "sentiment"),
                expected(changed(support_model(tiny_bert(tokenizer)), "sentiment", seed=1), "sentiment")]
    app = create_app(served, settings=ServeSettings(max_wait_ms=1), admin_root=root, api_key=KEY)

    async def race():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            async def swaps():
                codes = []
                for i in range(8):
                    r = await c.post("/v1/admin/tasks/sentiment/reload", json={"path": ["v2", "."][i % 2]}, headers=AUTH)
                    codes.append(r.status_code)
                    await asyncio.sleep(0.01)  # let predictions in between swaps
                return codes

            async def predictions():
                return [await c.post("/v1/predict", json={"inputs": TEXTS, "task": "sentiment"}) for _ in range(30)]

            return await asyncio.gather(swaps(), predictions(), predictions())

    codes, *batches = asyncio.run(race())
    assert codes == [200] * 8
    seen = set()
    for response in batches[0] + batches[1]:
        got = probabilities(response)
        matches = [i for i, version in enumerate(versions) if close(got, version, 1e-4)]
        assert len(matches) == 1, got  # one version for every row of a request: never a mix
        seen.add(matches[0])
    assert seen == {0, 1}


def test_unload_while_requests_wait_is_422_not_500(served, root, monkeypatch):
    slowed(served, monkeypatch, 0.3)
    app = create_app(served, settings=ServeSettings(max_wait_ms=0), admin_root=root, api_key=KEY)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            busy = asyncio.create_task(c.post("/v1/predict", json={"input": "hi", "task": "sentiment"}))
            await asyncio.sleep(0.1)  # its batch holds the model thread
            waiting = asyncio.create_task(c.post("/v1/predict", json={"input": ["a", "b"], "task": "similar-questions"}))
            await asyncio.sleep(0.05)
            unload = await c.delete("/v1/admin/tasks/similar-questions", headers=AUTH)
            return await busy, await waiting, unload

    busy, waiting, unload = asyncio.run(scenario())
    assert busy.status_code == 200 and unload.status_code == 200
    assert waiting.status_code == 422, waiting.text
    assert "unknown task 'similar-questions'" in waiting.json()["detail"] and "unloaded" in waiting.json()["detail"]


@pytest.mark.parametrize("asked, replacement", [("faq-answer", "pair"), ("similar-questions", "qa")])
def test_a_task_replaced_by_another_shape_while_requests_wait_is_422(tokenizer, monkeypatch, asked, replacement):
    """A QA context and a second sentence are both a text_pair: only the prediction's kind tells them apart."""
    model = support_model(tiny_bert(tokenizer))
    spec = {"pair": SPECS[1], "qa": SPECS[2]}[replacement]
    run = model.run

    def swap_then_run(items, batch_size=64):  # the unload and load that land between validation and the batch
        model.remove_task(asked)
        model.add_task(dataclasses.replace(spec, name=asked))
        return run(items, batch_size=batch_size)

    monkeypatch.setattr(model, "run", swap_then_run)
    value = QA if asked == "faq-answer" else ["where is my order", "has my parcel shipped"]
    with TestClient(create_app(model)) as c:
        response = c.post("/v1/predict", json={"input": value, "task": asked})
    assert response.status_code == 422, response.text
    shape = "qa" if asked == "faq-answer" else "pair"
    assert response.json()["detail"] == (f"inputs[0]: task {asked!r} was replaced, while the request waited, "
                                         f"by one that does not take {shape} inputs")


@pytest.mark.parametrize("path, status, message", [
    ("..", 403, "outside the admin root"),
    ("../bundle/../..", 403, "outside the admin root"),
    ("/etc", 403, "outside the admin root"),
    ("escape", 403, "outside the admin root"),  # a link inside the root to a folder outside it
    ("missing", 404, "no such folder"),
    ("standalone", 422, "not part of a bundle"),
    ("a\x00b", 422, "NUL"),
    ("a" * 300, 422, "unusable path"),  # longer than a file name may be
    ("\ud800", 422, "unicode"),  # a lone surrogate: JSON carries it, no file name can
])
def test_paths_stay_inside_the_root_and_tasks_need_a_manifest(served, root, path, status, message):
    outside = root.parent / "outside"
    served.save(outside, tasks=["sentiment"])
    (root / "escape").symlink_to(outside, target_is_directory=True)
    save_task(served, "sentiment", root / "standalone")  # a task folder that no bundle.json lists
    with TestClient(create_app(served, admin_root=root, api_key=KEY)) as c:
        body = json.dumps({"path": path, "task": "sentiment"})  # ASCII-escaped: a lone surrogate travels too
        response = c.post("/v1/admin/tasks", content=body, headers={**AUTH, "content-type": "application/json"})
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]
        if status != 422:
            assert str(root) not in response.json()["detail"]  # the server's own paths are not shown


@pytest.mark.parametrize("manifest", [[], {"tasks": ["faq-answer"], "files": {}}, {"tasks": "faq-answer"},
                                      {"tasks": {"faq-answer": "faq-answer"}, "files": []}])
@pytest.mark.parametrize("body", [{"path": "broken", "task": "faq-answer"}, {"path": "broken/faq-answer"}])
def test_a_malformed_bundle_manifest_is_422_not_500(served, root, manifest, body):
    shutil.copytree(root / "faq-answer", root / "broken" / "faq-answer")
    write_json(root / "broken" / BUNDLE_FILE, manifest)
    with TestClient(create_app(served, admin_root=root, api_key=KEY), raise_server_exceptions=False) as c:
        response = c.post("/v1/admin/tasks", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert "broken" in response.json()["detail"] and "faq-answer" not in served.specs
    assert str(root) not in response.json()["detail"]  # paths as the client gave them, not the server's


@pytest.mark.parametrize("record", [[], {"format": "mtpeft-task", "spec": []}])
def test_a_task_file_that_is_not_a_task_object_is_422_not_500(served, root, record):
    shutil.copytree(root / "faq-answer", root / "broken" / "faq-answer")
    manifest = read_json(root / BUNDLE_FILE)
    manifest["tasks"] = {"faq-answer": "faq-answer"}
    task_file = root / "broken" / "faq-answer" / "task.json"
    if isinstance(record, dict):
        record["format"] = read_json(task_file)["format"]
    task_file.write_text(json.dumps(record))
    manifest["files"]["faq-answer/task.json"] = hashlib.sha256(task_file.read_bytes()).hexdigest()
    write_json(root / "broken" / BUNDLE_FILE, manifest)
    with TestClient(create_app(served, admin_root=root, api_key=KEY), raise_server_exceptions=False) as c:
        response = c.post("/v1/admin/tasks", json={"path": "broken/faq-answer"}, headers=AUTH)
    assert response.status_code == 422, response.text
    assert "broken/faq-answer" in response.json()["detail"] and "faq-answer" not in served.specs
    assert str(root) not in response.json()["detail"]


def test_a_changed_file_or_a_misfit_adapter_changes_nothing(tokenizer, served, root):
    before = expected(served, "sentiment")
    head = root / "v2" / "sentiment" / HEAD_WEIGHTS
    head.write_bytes(head.read_bytes()[:-4] + b"\0\0\0\0")  # bytes changed after the manifest was written
    with TestClient(create_app(served, admin_root=root, api_key=KEY)) as c:
        response = c.post("/v1/admin/tasks/sentiment/reload", json={"path": "v2"}, headers=AUTH)
        assert response.status_code == 422 and "sha256" in response.json()["detail"]
        assert str(root) not in response.json()["detail"], response.text

        # An adapter that passes its manifest but lacks a layer: refused before the old version is touched.
        misfit = support_model(tiny_bert(tokenizer))
        misfit.save(root / "v3", tasks=["sentiment"])
        adapter = root / "v3" / "sentiment" / ADAPTER_WEIGHTS
        weights = read_safetensors(adapter)
        write_safetensors(adapter, dict(list(weights.items())[2:]), metadata={"format": "pt"})
        manifest = read_json(root / "v3" / BUNDLE_FILE)
        task_file = root / "v3" / "sentiment" / TASK_FILE  # it records its files' sha256 too
        record = read_json(task_file)
        record["files"][ADAPTER_WEIGHTS] = hashlib.sha256(adapter.read_bytes()).hexdigest()
        write_json(task_file, record)
        for file in (adapter, task_file):
            manifest["files"][f"sentiment/{file.name}"] = hashlib.sha256(file.read_bytes()).hexdigest()
        write_json(root / "v3" / BUNDLE_FILE, manifest)
        response = c.post("/v1/admin/tasks/sentiment/reload", json={"path": "v3"}, headers=AUTH)
        assert response.status_code == 422 and "does not fit" in response.json()["detail"]
        assert str(root) not in response.json()["detail"], response.text

        other = support_model(tiny_bert(tokenizer, seed=3))  # another backbone
        other.save(root / "other", tasks=["sentiment"])
        response = c.post("/v1/admin/tasks/sentiment/reload", json={"path": "other"}, headers=AUTH)
        assert response.status_code == 422 and "backbone" in response.json()["detail"]

        assert close(probabilities(c.post("/v1/predict", json={"inputs": TEXTS, "task": "sentiment"})), before)
        assert sorted(served.specs) == ["sentiment", "similar-questions"]


def test_a_task_named_as_the_probe_is_refused_and_loading_goes_on(tokenizer, served, root):
    # It loaded, and from then on every load and reload was refused: the probe's name was taken.
    from mtpeft.admin import PROBE

    odd = support_model(tiny_bert(tokenizer))
    odd.add_task(dataclasses.replace(SPECS[0], name=PROBE))
    odd.save(root / "odd", tasks=[PROBE])
    with TestClient(create_app(served, admin_root=root, api_key=KEY)) as c:
        response = c.post("/v1/admin/tasks", json={"path": "odd"}, headers=AUTH)
        assert response.status_code == 422 and "kept for checking new tasks" in response.json()["detail"]
        assert PROBE not in served.specs
        assert c.post("/v1/admin/tasks", json={"path": "faq-answer"}, headers=AUTH).status_code == 200


def test_support_tasks_are_pinned(tokenizer, root):
    model = support_model(tiny_bert(tokenizer))
    relabelled = support_model(tiny_bert(tokenizer))
    spec = relabelled.spec("sentiment")
    relabelled.remove_task("sentiment")
    relabelled.add_task(dataclasses.replace(spec, labels=["bad", "meh", "good"]))
    relabelled.save(root / "relabelled", tasks=["sentiment"])
    app = create_app(model, support=SupportPipeline(model, FAQ, top_k=2), admin_root=root, api_key=KEY)
    with TestClient(app) as c:
        response = c.delete("/v1/admin/tasks/sentiment", headers=AUTH)
        assert response.status_code == 409 and "/v1/support" in response.json()["detail"]
        response = c.post("/v1/admin/tasks/sentiment/reload", json={"path": "relabelled"}, headers=AUTH)
        assert response.status_code == 409 and "labels" in response.json()["detail"]
        assert c.post("/v1/admin/tasks/sentiment/reload", json={"path": "v2"}, headers=AUTH).status_code == 200
        assert c.post("/v1/support", json={"message": "How do I return an item?"}).status_code == 200


def test_management_is_in_the_openapi_schema_with_its_auth(served, root):
    with TestClient(create_app(served, admin_root=root, api_key=KEY)) as c:
        schema = c.get("/openapi.json").json()
    assert {"/v1/admin/tasks", "/v1/admin/tasks/{name}/reload", "/v1/admin/tasks/{name}"} <= set(schema["paths"])
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
    assert json.dumps(schema["paths"]["/v1/admin/tasks/{name}"]["delete"]["security"])


def test_management_with_an_adapter_store(tokenizer, root):
    """With ``--max-active-adapters`` tasks are registered in the store; the same endpoints work."""
    from mtpeft import MultiTaskModel
    from mtpeft.adapter_cache import AdapterStore

    model = MultiTaskModel(tiny_bert(tokenizer))
    model.bf16 = False
    store = AdapterStore.from_bundle(model, root, capacity=1)
    v1 = support_model(tiny_bert(tokenizer))
    v2 = changed(support_model(tiny_bert(tokenizer)), "sentiment", seed=1)
    body = {"inputs": TEXTS, "task": "sentiment"}
    with TestClient(create_app(model, store=store, admin_root=root, api_key=KEY)) as c:
        assert close(probabilities(c.post("/v1/predict", json=body)), expected(v1, "sentiment"))
        assert c.post("/v1/admin/tasks/sentiment/reload", json={"path": "v2"}, headers=AUTH).status_code == 200
        assert close(probabilities(c.post("/v1/predict", json=body)), expected(v2, "sentiment"))
        assert c.delete("/v1/admin/tasks/faq-answer", headers=AUTH).json()["tasks"] == ["sentiment", "similar-questions"]
        assert "faq-answer" not in store.specs and "faq-answer" not in model.specs
        assert c.post("/v1/predict", json={"input": QA, "task": "faq-answer"}).status_code == 422
        assert c.post("/v1/admin/tasks", json={"path": "faq-answer"}, headers=AUTH).status_code == 200
        answer = c.post("/v1/predict", json={"input": QA, "task": "faq-answer"}).json()["results"][0]["prediction"]
        assert answer == v1.predict(QA, task="faq-answer").to_dict()
        assert len(model.specs) == 1  # capacity 1: only the task of the last batch is active


def test_a_routers_task_loaded_again_into_an_adapter_store_is_routed_to(tokenizer, root):
    """The store pins the learned router's tasks, which picks among the model's active ones; one
    unloaded and loaded back must be pinned again, not routed to only while it happens to be active."""
    from mtpeft import MultiTaskModel
    from mtpeft.adapter_cache import AdapterStore
    from mtpeft.router import LearnedRouter
    from tiny_bundle import ROUTER_EXAMPLES

    fitted = LearnedRouter.fit(support_model(tiny_bert(tokenizer)), ROUTER_EXAMPLES)
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.bf16 = False
    store = AdapterStore.from_bundle(model, root, capacity=1)
    router = LearnedRouter(model, fitted.classes, fitted.shapes, fitted.weight, fitted.bias, fitted.threshold)
    store.pin(task for task in router.classes if task in store.specs)  # as serving_store does
    body = {"input": "I love it, great service"}
    with TestClient(create_app(model, router, store=store, admin_root=root, api_key=KEY)) as c:
        assert c.post("/v1/predict", json=body).json()["results"][0]["task"] == "sentiment"
        assert c.delete("/v1/admin/tasks/sentiment", headers=AUTH).status_code == 200
        assert c.post("/v1/admin/tasks", json={"path": "sentiment"}, headers=AUTH).status_code == 200
        assert "sentiment" in store.pinned_tasks
        result = c.post("/v1/predict", json=body).json()["results"][0]
        assert result["task"] == "sentiment", result["route"]


def test_a_joint_models_tasks_loaded_one_at_a_time_share_its_adapter(tokenizer, served, root):
    from mtpeft.config import LoraSettings
    from mtpeft.joint import build_joint_model
    from mtpeft.model import SHARED_ADAPTER
    from mtpeft.tasks import TaskSpec

    specs = [TaskSpec(name="mood", type="classification", labels=["neg", "pos"]),
             TaskSpec(name="topic", type="classification", labels=["billing", "delivery", "other"])]
    joint = build_joint_model(tiny_bert(tokenizer), specs, LoraSettings(r=4, alpha=8), seed=0)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in joint.lora_layers(SHARED_ADAPTER).values():
            layer.lora_B[SHARED_ADAPTER].weight.normal_(std=0.5)  # a trained adapter, not the zero start
    joint.save(root / "joint")
    with TestClient(create_app(served, admin_root=root, api_key=KEY)) as c:
        for task in ("mood", "topic"):
            response = c.post("/v1/admin/tasks", json={"path": "joint", "task": task}, headers=AUTH)
            assert response.status_code == 200, response.text
        assert served.adapter_alias == {"mood": SHARED_ADAPTER, "topic": SHARED_ADAPTER}
        body = {"inputs": TEXTS, "task": ["mood", "topic"] * 3}
        got = c.post("/v1/predict", json=body).json()["results"]
    joint.bf16 = served.bf16
    want = joint.predict(TEXTS, task=["mood", "topic"] * 3)
    for row, prediction in zip(got, want, strict=True):
        assert close([row["prediction"]["probabilities"]], [prediction.to_dict()["probabilities"]], tol=1e-3)
