"""The HTTP server in-process: endpoints, routing precedence, micro-batching, limits, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from conftest import tiny_bert  # noqa: E402
from mtpeft.router import LearnedRouter  # noqa: E402
from mtpeft.runtime import KERNEL_CACHE_ENV, SERVING_KERNEL_CACHE  # noqa: E402
from mtpeft.serve import ServeSettings, create_app, load_server  # noqa: E402
from mtpeft.support import SupportPipeline  # noqa: E402
from tiny_bundle import FAQ, QA, ROUTER_EXAMPLES, path_backbone, saved_backbone, slowed, support_model  # noqa: E402


@pytest.fixture(scope="module")
def model(tokenizer):
    return support_model(tiny_bert(tokenizer))


@pytest.fixture(scope="module")
def router(model):
    return LearnedRouter.fit(model, ROUTER_EXAMPLES)


@pytest.fixture(scope="module")
def support(model):
    return SupportPipeline(model, FAQ, top_k=2)


@pytest.fixture
def run_calls(model, monkeypatch):
    """Every ``model.run`` call's task list, in order."""
    calls, run = [], model.run

    def spy(items, batch_size=64):
        calls.append([task for task, _ in items])
        return run(items, batch_size=batch_size)

    monkeypatch.setattr(model, "run", spy)
    return calls


@pytest.fixture
def client(model, router, support):
    with TestClient(create_app(model, router, support, ServeSettings(max_wait_ms=1, max_inputs=4, max_text_chars=100,
                                                                     max_context_chars=300, max_body_bytes=4000))) as c:
        yield c


def test_health_and_tasks(client):
    assert client.get("/healthz").json() == {"status": "ok", "tasks": 3, "router": "learned", "support": True}
    data = client.get("/v1/tasks").json()
    tasks = {t["name"]: t for t in data["tasks"]}
    assert tasks["sentiment"] == {"name": "sentiment", "type": "classification", "input": "text",
                                  "labels": ["negative", "neutral", "positive"],
                                  "description": "Sentiment of a customer message.",
                                  "metrics": {"accuracy": 0.5, "examples": 10}}
    assert (tasks["similar-questions"]["input"], tasks["faq-answer"]["input"]) == ("pair", "qa")
    assert data["router"]["kind"] == "learned" and data["router"]["threshold"] == 0.5 and data["support"]


def test_mixed_task_request_runs_in_one_model_call(client, run_calls):
    response = client.post("/v1/predict", json={
        "inputs": ["great", ["where is it?", "has it shipped?"], QA, {"text": "a", "text_pair": "b"}],
        "task": ["sentiment", "similar-questions", "faq-answer", "similar-questions"]})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["prediction"]["type"] for r in results] == ["label", "label", "answer", "label"]
    assert [r["route"]["source"] for r in results] == ["explicit"] * 4
    assert run_calls == [["sentiment", "similar-questions", "faq-answer", "similar-questions"]]


def test_concurrent_requests_share_one_forward_pass(model, run_calls):
    app = create_app(model, settings=ServeSettings(max_wait_ms=500))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            bodies = [{"input": "great", "task": "sentiment"}, {"input": ["a", "b"], "task": "similar-questions"},
                      {"input": QA, "task": "faq-answer"}, {"input": "bad", "task": "sentiment"}]
            return await asyncio.gather(*(c.post("/v1/predict", json=b) for b in bodies))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 4
    assert len(run_calls) == 1 and sorted(run_calls[0]) == ["faq-answer", "sentiment", "sentiment", "similar-questions"]
    assert [r.json()["results"][0]["task"] for r in responses] == ["sentiment", "similar-questions", "faq-answer", "sentiment"]
    with TestClient(app) as c:
        metrics = c.get("/metrics").text
    assert "mtpeft_batch_requests_bucket{le=\"4.0\"} 1.0" in metrics and "mtpeft_batch_rows_sum 4.0" in metrics


def test_explicit_task_wins_over_the_router(client):
    body = {"inputs": ["tell me a joke", "tell me a joke", "I love it, great service"], "task": ["sentiment", None, None]}
    explicit, unmatched, routed = client.post("/v1/predict", json=body).json()["results"]
    assert (explicit["task"], explicit["route"]["source"], explicit["prediction"]["task"]) == ("sentiment", "explicit", "sentiment")
    assert unmatched["task"] is None and unmatched["prediction"] is None
    assert unmatched["error"].startswith("no task matched") and len(unmatched["route"]["candidates"]) == 3
    assert (routed["task"], routed["route"]["source"]) == ("sentiment", "router")
    # Matched no task: a label no task can have ("none" can be a task's name).
    assert 'mtpeft_routes_total{source="router",task="(none)"} 1.0' in client.get("/metrics").text


def test_structured_inputs_route_by_shape_and_text_routed_to_qa_explains(client):
    pair, qa, request = client.post("/v1/predict", json={
        "inputs": [["x", "y"], QA, "what does the FAQ say about returns"]}).json()["results"]
    assert (pair["task"], qa["task"], request["task"]) == ("similar-questions", "faq-answer", "faq-answer")
    assert pair["prediction"]["type"] == "label" and qa["prediction"]["type"] == "answer"
    assert request["prediction"] is None and "which needs another input" in request["error"]


@pytest.mark.parametrize("body, status, message", [
    ({"inputs": ["a"] * 5}, 422, "5 inputs, over max_inputs=4"),
    ({"input": "x" * 101}, 422, "over max_text_chars=100"),
    ({"input": {"question": "q", "context": "c" * 301}}, 422, "over max_context_chars=300"),
    ({"input": "y" * 5000}, 413, "max_body_bytes=4000"),
    ({"input": " \n"}, 422, "inputs[0]: empty text"),
    ({"inputs": ["ok", ["a", ""]]}, 422, "inputs[1]: empty text"),
    ({"input": {"question": "q", "context": ""}}, 422, "inputs[0]: empty text"),
    ({"input": "x", "task": "nope"}, 422, "unknown task 'nope'; known tasks: ['faq-answer', 'sentiment', 'similar-questions']"),
    ({"input": "x", "task": "faq-answer"}, 422, "inputs[0]: task 'faq-answer' answers questions"),
    ({"input": "x", "task": "similar-questions"}, 422, "compares two texts"),
    ({"inputs": ["a", "b"], "task": ["sentiment"]}, 422, "1 task names for 2 inputs"),
    ({"input": "x", "inputs": ["y"]}, 422, "exactly one of 'input'"),
    ({}, 422, "exactly one of 'input'"),
    ({"inputs": []}, 422, "'inputs' is empty"),
    ({"inputs": [["a", "b", "c"]]}, 422, "invalid request: inputs.0 (as a [text, text] pair): List should have at most 2"),
    # an input that fits no form is told the form it comes closest to, not every form's complaint
    ({"inputs": [{"question": "x"}]}, 422, 'invalid request: inputs.0 (as {"question", "context"}): context: Field required'),
    ({"inputs": ["ok", 123]}, 422, 'inputs.1: expected a text, {"question", "context"}, {"text", "text_pair"}, {"text"} or a'),
    ({"inputs": [3]}, 422, "invalid request: inputs"),
    ({"input": "x", "extra": 1}, 422, "invalid request: extra"),
])
def test_limits_and_malformed_inputs_are_4xx_with_a_message(client, body, status, message):
    response = client.post("/v1/predict", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize("text", ["\u200b", "\u0000", "\ufeff", "\u200b \u200c", "\t\u2060\u00ad\n"])
def test_a_text_of_only_invisible_characters_is_empty(client, text):
    # The tokenizer drops zero-width, control and format characters: "\u200b" reached the model as an
    # empty text and was answered (200) where " " is refused.
    for body in ({"input": text}, {"input": text, "task": "sentiment"}, {"inputs": ["ok", ["a", text]]},
                 {"input": {"question": "q", "context": text}}):
        response = client.post("/v1/predict", json=body)
        assert response.status_code == 422 and "empty text" in response.json()["detail"], response.text
    response = client.post("/v1/support", json={"message": text})
    assert response.status_code == 422 and response.json()["detail"] == "the message is empty", response.text
    assert client.post("/v1/predict", json={"input": "ok\u200b", "task": "sentiment"}).status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/predict", '{"input": "\\ud800", "task": "sentiment"}'),
    ("/v1/predict", '{"inputs": [["a", "\\udfff"]]}'),
    ("/v1/predict", '{"input": {"question": "q", "context": "\\ud800"}, "task": "faq-answer"}'),
    ("/v1/predict", '{"input": "hi", "task": "\\ud800"}'),
    ("/v1/support", '{"message": "\\ud800 where is my parcel?"}'),
])
def test_a_lone_surrogate_is_422_not_500(client, path, body):
    """JSON can escape half a UTF-16 pair; it is no text, and echoing it back must not break the answer."""
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "nicode" in response.text  # the detail, or the field errors of a union


@pytest.mark.parametrize("path, body", [
    ("/v1/predict", '{"input": 1e999}'),
    ("/v1/predict", '{"input": "a", "task": NaN}'),
    ("/v1/predict", '{"inputs": [[-Infinity, "b"]]}'),
    ("/v1/predict", "NaN"),
    ("/v1/support", '{"message": NaN}'),
    ("/v1/support", '{"message": "where is my parcel?", "top_k": Infinity}'),
])
def test_non_finite_numbers_in_a_request_are_422_not_500(client, path, body):
    """Python's json reads NaN, Infinity and 1e999; echoing them back in the field errors must
    still give strict JSON (no NaN tokens), not a failed response."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    for content_type in ("application/json", "application/problem+json"):  # the fast path and FastAPI's
        response = client.post(path, content=body, headers={"content-type": content_type})
        assert response.status_code == 422, response.text
        assert json.loads(response.text, parse_constant=refuse)["detail"].startswith("invalid request")


def test_a_non_finite_prediction_is_a_500_that_says_so(model, monkeypatch):
    run = model.run

    def broken(items, batch_size=64):
        return [dataclasses.replace(p, score=float("nan")) for p in run(items, batch_size=batch_size)]

    monkeypatch.setattr(model, "run", broken)
    with TestClient(create_app(model, settings=ServeSettings(max_wait_ms=0))) as c:
        response = c.post("/v1/predict", json={"inputs": ["fine", "great"], "task": "sentiment"})
    assert response.status_code == 500
    assert response.json()["detail"].startswith("inputs[0]: task 'sentiment' gave a non-finite score")


@pytest.mark.parametrize("body", [
    {"inputs": ["tell me a joke", "I love it, great service", ["x", "y"], QA], "task": ["sentiment", None, None, None]},
    {"input": "x", "task": "nope"},
    {"inputs": [3]},
    {"input": " "},
])
def test_the_fast_path_answers_as_the_full_stack_does(client, body):
    """``application/json`` takes the fast path; ``+json`` bodies go through FastAPI's routing."""
    fast = client.post("/v1/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    full = client.post("/v1/predict", content=json.dumps(body), headers={"content-type": "application/problem+json"})
    assert (fast.status_code, fast.json()) == (full.status_code, full.json())


@pytest.mark.parametrize("body", [b"[" * 1500, b'{"input": ' + b"[" * 1400 + b"]" * 1400 + b"}"])
def test_json_nested_too_deep_is_a_4xx_on_the_fast_path_too(client, body):
    """json.loads raises RecursionError (not a ValueError) on deep nesting: a bad body, not a server fault.

    At Python's default recursion limit: torch.compile raises it to 2000 in a process where it ran."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        fast = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        full = client.post("/v1/predict", content=body, headers={"content-type": "application/problem+json"})
    finally:
        sys.setrecursionlimit(limit)
    assert fast.status_code == full.status_code == 400, fast.text
    assert fast.json() == full.json()


def test_a_body_not_sent_as_json_is_not_read_as_json(client):
    response = client.post("/v1/predict", content='{"input": "great", "task": "sentiment"}',
                           headers={"content-type": "text/plain"})
    assert response.status_code == 422 and "invalid request" in response.json()["detail"]


def test_invalid_json_is_422_with_the_reason(client):
    response = client.post("/v1/predict", content=b'{"inputs": ["hi"', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"] == "invalid request: invalid JSON at character 16: Expecting ',' delimiter"


def test_metrics_count_requests_latency_batches_and_tasks(client):
    client.post("/v1/predict", json={"input": "great", "task": "sentiment"})
    client.post("/v1/predict", json={"input": "x", "task": "nope"})
    text = client.get("/metrics").text
    for line in ('mtpeft_requests_total{endpoint="/v1/predict",status="200"} 1.0',
                 'mtpeft_requests_total{endpoint="/v1/predict",status="422"} 1.0',
                 'mtpeft_predictions_total{task="sentiment"} 1.0',
                 'mtpeft_routes_total{source="explicit",task="sentiment"} 1.0',
                 "mtpeft_batch_rows_count 1.0"):
        assert line in text, line
    assert 'mtpeft_request_seconds_bucket{endpoint="/v1/predict",le="+Inf"} 2.0' in text


def test_metrics_count_nothing_of_a_rejected_request(client):
    """Its first input was routed before its second was found to be the wrong shape for its task."""
    response = client.post("/v1/predict", json={"inputs": ["great", "no question"], "task": ["sentiment", "faq-answer"]})
    assert response.status_code == 422, response.text
    text = client.get("/metrics").text
    assert 'mtpeft_requests_total{endpoint="/v1/predict",status="422"} 1.0' in text
    assert "mtpeft_routes_total{" not in text and "mtpeft_predictions_total{" not in text


def test_support_endpoint_shape(client, run_calls):
    response = client.post("/v1/support", json={"message": "How do I return an item?"})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["sentiment"]["type"] == "label" and len(data["similar"]) == 2
    assert set(data["answer"]) == {"text", "score", "start", "end", "no_answer", "faq_id", "question", "context"}
    assert run_calls == [["sentiment", "similar-questions", "similar-questions"], ["faq-answer"]]
    assert len(client.post("/v1/support", json={"message": "refund?", "top_k": 1}).json()["similar"]) == 1
    assert client.post("/v1/support", json={"message": " "}).status_code == 422
    assert "max_text_chars=100" in client.post("/v1/support", json={"message": "z" * 101}).json()["detail"]


def test_support_counts_each_prediction_of_its_tasks(client):
    """One reply makes a similarity prediction per FAQ question it re-ranks, not one in all."""
    assert client.post("/v1/support", json={"message": "How do I return an item?", "top_k": 3}).status_code == 200
    text = client.get("/metrics").text
    for line in ('mtpeft_predictions_total{task="sentiment"} 1.0',
                 'mtpeft_predictions_total{task="similar-questions"} 3.0',
                 'mtpeft_predictions_total{task="faq-answer"} 1.0'):
        assert line in text, line


def test_support_reindexes_an_edited_faq_on_the_model_thread(model, tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text("".join(json.dumps({"id": e.id, "question": e.question, "context": e.context}) + "\n"
                            for e in FAQ[:1]))
    pipeline = SupportPipeline(model, path, top_k=4)
    with TestClient(create_app(model, support=pipeline, settings=ServeSettings(max_wait_ms=1))) as c:
        assert [s["id"] for s in c.post("/v1/support", json={"message": "refund?"}).json()["similar"]] == ["faq-1"]
        path.write_text("".join(json.dumps({"id": e.id, "question": e.question, "context": e.context}) + "\n"
                                for e in FAQ))
        os.utime(path, ns=(1, 1))
        reply = c.post("/v1/support", json={"message": "refund?"})
        assert reply.status_code == 200, reply.text
        assert sorted(s["id"] for s in reply.json()["similar"]) == [e.id for e in FAQ]


def test_an_edited_faq_too_big_to_embed_within_the_request_timeout_is_still_reindexed(model, tmp_path, monkeypatch):
    # The whole FAQ went to the model thread as one job bounded by request_timeout_s: a FAQ that takes
    # longer to embed was never re-indexed (a 503 inside, logged, tried again a minute later, forever).
    import time

    import mtpeft.serve as serve_module

    entries = [{"id": f"e{i}", "question": f"question {i}?", "context": f"Answer {i}."} for i in range(200)]
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps(entries[0]) + "\n")
    pipeline = SupportPipeline(model, path, top_k=4)
    real = serve_module.embed_texts

    def slow(model, texts, **options):  # 10 ms a text: 64 take 0.64 s, 200 take 2 s
        time.sleep(0.01 * len(texts))
        return real(model, texts, **options)

    monkeypatch.setattr(serve_module, "embed_texts", slow)
    with TestClient(create_app(model, support=pipeline, settings=ServeSettings(max_wait_ms=1, request_timeout_s=1.5))) as c:
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
        os.utime(path, ns=(5, 5))
        reply = c.post("/v1/support", json={"message": "refund?"})
        assert reply.status_code == 200, reply.text
    assert len(pipeline.entries) == 200 and len(reply.json()["similar"]) == 4

def test_an_app_routes_with_the_models_own_router_by_default(model, router):
    """As model.predict does: a loaded bundle's learned router, not the shape rule."""
    model.router = router
    try:
        with TestClient(create_app(model, settings=ServeSettings(max_wait_ms=1))) as c:
            assert c.get("/healthz").json()["router"] == "learned"
            result = c.post("/v1/predict", json={"inputs": ["tell me a joke"]}).json()["results"][0]
            assert result["route"]["source"] == "router" and result["task"] is None
    finally:
        model.router = None


def test_support_is_404_without_a_pipeline(model):
    with TestClient(create_app(model)) as c:
        response = c.post("/v1/support", json={"message": "hi"})
        assert response.status_code == 404 and "no support pipeline" in response.json()["detail"]
        assert c.get("/healthz").json()["router"] == "shape"


def test_page_is_self_contained_and_schema_documents_the_api(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "v1/support" in page.text and "http://" not in page.text and "https://" not in page.text
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/tasks", "/v1/support", "/healthz", "/metrics"} <= set(schema["paths"])
    assert {"PredictRequest", "PredictResponse", "QAInput", "LabelOut", "AnswerOut"} <= set(schema["components"]["schemas"])


def test_load_server_and_serve_cli(tokenizer, tmp_path, monkeypatch):
    backbone_dir = saved_backbone(tmp_path / "backbone", tokenizer)
    model = support_model(path_backbone(backbone_dir))
    model.save(tmp_path / "bundle")
    LearnedRouter.fit(model, ROUTER_EXAMPLES).save(tmp_path / "bundle" / "router")
    started = {}
    for name in KERNEL_CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kw: started.update(app=app, host=host, port=port))
    from mtpeft.cli import main

    faq = tmp_path / "faq.jsonl"
    faq.write_text("".join(json.dumps({"question": e.question, "context": e.context}) + "\n" for e in FAQ))
    assert main(["serve", str(tmp_path / "bundle"), "--port", "8123", "--faq", str(faq), "--max-inputs", "7"]) == 0
    assert started["port"] == 8123 and started["app"].state.settings.max_inputs == 7
    assert all(os.environ[name] == str(SERVING_KERNEL_CACHE) for name in KERNEL_CACHE_ENV)  # flat memory over shapes
    assert started["app"].state.manager.root == (tmp_path / "bundle").resolve()  # task management loads from the bundle
    assert main(["serve", str(tmp_path / "bundle"), "--admin-root", str(tmp_path)]) == 0
    assert started["app"].state.manager.root == tmp_path.resolve()
    with TestClient(started["app"]) as c:
        assert c.get("/healthz").json() == {"status": "ok", "tasks": 3, "router": "learned", "support": True}
    model.save(tmp_path / "one", tasks=["sentiment"])
    with pytest.raises(ValueError, match="--faq needs the support tasks"):
        load_server(tmp_path / "one", faq=faq)


def test_overload_and_timeout_are_503_with_retry_after(model, monkeypatch):
    slowed(model, monkeypatch, 0.3)
    app = create_app(model, settings=ServeSettings(max_wait_ms=0, max_queued=1, request_timeout_s=5))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/v1/predict", json={"input": "hi", "task": "sentiment"})
                                          for _ in range(4)))

    statuses = sorted(r.status_code for r in asyncio.run(burst()))
    assert 200 in statuses and 503 in statuses
    busy = next(r for r in asyncio.run(burst()) if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "max_queued=1" in busy.json()["detail"]

    slow_app = create_app(model, settings=ServeSettings(max_wait_ms=0, request_timeout_s=0.05))
    with TestClient(slow_app) as c:
        response = c.post("/v1/predict", json={"input": "hi", "task": "sentiment"})
    assert response.status_code == 503 and "request_timeout_s" in response.json()["detail"]


def test_a_request_its_client_gave_up_on_is_no_500_and_does_not_hold_up_later_ones(model, monkeypatch):
    slowed(model, monkeypatch, 0.2)
    app = create_app(model, settings=ServeSettings(max_wait_ms=0))

    async def give_up_then_ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            post = functools.partial(c.post, "/v1/predict", json={"input": "hi", "task": "sentiment"})
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(post(), 0.05)  # the app is cancelled with the client's request
            return await post(), app.state.batcher.waiting

    response, waiting = asyncio.run(give_up_then_ask())
    assert response.status_code == 200 and waiting == 0
    text = generate_latest(app.state.metrics.registry).decode()
    assert 'mtpeft_requests_total{endpoint="/v1/predict",status="499"} 1.0' in text
    assert 'status="500"' not in text


def test_shutdown_drains_accepted_requests_and_refuses_new_ones(model, monkeypatch):
    slowed(model, monkeypatch, 0.2)
    app = create_app(model, settings=ServeSettings(max_wait_ms=0, drain_timeout_s=5))

    async def scenario():
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            accepted = [asyncio.create_task(c.post("/v1/predict", json={"input": f"hi {i}", "task": "sentiment"}))
                        for i in range(3)]
            await asyncio.sleep(0.05)  # one batch runs, the others queue behind it
            shutdown = asyncio.create_task(lifespan.__aexit__(None, None, None))
            await asyncio.sleep(0.05)
            late = await c.post("/v1/predict", json={"input": "late", "task": "sentiment"})
            done = await asyncio.gather(*accepted)
            await shutdown
            return done, late, app.state.batcher.waiting

    done, late, waiting = asyncio.run(scenario())
    assert [r.status_code for r in done] == [200, 200, 200]
    assert late.status_code == 503 and late.headers["retry-after"] == "1" and "shutting down" in late.json()["detail"]
    assert waiting == 0


def test_drain_is_bounded_and_close_answers_what_is_left():
    import time
    from concurrent.futures import ThreadPoolExecutor

    from mtpeft.batcher import MicroBatcher, Overloaded

    executor = ThreadPoolExecutor(max_workers=1)
    batcher = MicroBatcher(lambda items: (time.sleep(0.3), [task for task, _ in items])[1], executor, max_wait_ms=0)

    async def scenario():
        jobs = [asyncio.create_task(batcher.submit([("t", i)])) for i in range(3)]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        left = await batcher.drain(0.1)
        waited = time.perf_counter() - started
        await batcher.close()
        return left, waited, await asyncio.gather(*jobs, return_exceptions=True)

    left, waited, results = asyncio.run(scenario())
    executor.shutdown(wait=True)
    assert left == 3 and 0.09 < waited < 0.25
    assert all(isinstance(r, Overloaded) and "shut down" in str(r) for r in results)


def test_close_returns_when_a_request_arrives_in_the_same_loop_turn():
    """A request queued in the turn ``close`` cancels the gathering worker must not swallow the
    cancellation (``asyncio.wait_for`` before 3.12 returns the request instead): close would never return."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from mtpeft.batcher import MicroBatcher, Overloaded

    executor = ThreadPoolExecutor(max_workers=1)
    batcher = MicroBatcher(lambda items: (time.sleep(0.1), [x for _, x in items])[1], executor, max_wait_ms=1000)

    async def scenario():
        first = asyncio.create_task(batcher.submit([("t", 1)]))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(batcher.submit([("t", 2)]))  # queued while the first runs
        await asyncio.sleep(0.2)  # the first is answered; the worker gathers company for the second
        third = asyncio.create_task(batcher.submit([("t", 3)]))
        closing = asyncio.create_task(batcher.close())  # the same loop turn as the third
        done, _ = await asyncio.wait([closing], timeout=2)
        return closing in done, await asyncio.gather(first, second, third, return_exceptions=True)

    closed, results = asyncio.run(scenario())
    executor.shutdown(wait=True)
    assert closed, "close() did not return"
    assert results[0] == [1] and all(isinstance(r, Overloaded) for r in results[1:]), results


def test_support_sheds_load_with_503_too(model, support, monkeypatch):
    slowed(model, monkeypatch, 0.3)
    app = create_app(model, support=support, settings=ServeSettings(max_wait_ms=0, max_queued=1))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/v1/support", json={"message": f"where is order {i}?"})
                                          for i in range(4)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses and max(statuses) == 503, statuses
    assert next(r for r in responses if r.status_code == 503).headers["retry-after"] == "1"


def test_routing_and_support_waits_are_bounded_by_the_request_timeout(model, router, support, monkeypatch):
    """The learned router and the FAQ search use the model thread outside the batcher; a busy one is a 503 too."""
    slowed(model, monkeypatch, 0.5)
    app = create_app(model, router, support, ServeSettings(max_wait_ms=0, request_timeout_s=0.2))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            busy = asyncio.create_task(c.post("/v1/predict", json={"input": "hi", "task": "sentiment"}))
            await asyncio.sleep(0.05)  # the model thread is taken for 0.5 s
            routed = await c.post("/v1/predict", json={"input": "I love it, great service"})
            faq = await c.post("/v1/support", json={"message": "How do I return an item?"})
            return await busy, routed, faq

    busy, routed, faq = asyncio.run(burst())
    assert busy.status_code == 503  # its own prediction took over 0.2 s
    for response in (routed, faq):
        assert response.status_code == 503 and "model thread did not answer" in response.json()["detail"], response.text


@pytest.mark.parametrize("top_k", [True, "3", 2.5, 0])
def test_support_top_k_must_be_a_real_count(client, top_k):
    response = client.post("/v1/support", json={"message": "where is my parcel?", "top_k": top_k})
    assert response.status_code == 422, response.text


def test_warm_up_runs_every_task_at_its_largest_batch(model, monkeypatch):
    """The memory high-water mark is reached at start-up: each task sees a full batch of
    inputs that fill its max_length."""
    seen, run = [], model.run

    def recording(items, batch_size=64):
        encoded = [model.tokenizer(e.text, e.text_pair, truncation=True, max_length=model.spec(t).max_length)
                   for t, e in items]
        seen.append((items[0][0], len(items), max(len(x["input_ids"]) for x in encoded)))
        return run(items, batch_size=batch_size)

    monkeypatch.setattr(model, "run", recording)
    from mtpeft.serve import warm_up

    warm_up(model, batch_size=16)
    for task in model.task_names:
        assert (task, 16, model.spec(task).max_length) in seen
        assert {rows for name, rows, _ in seen if name == task} == {1, 8, 16}


def test_a_cold_task_whose_files_changed_on_disk_is_a_500_that_says_so(tokenizer, tmp_path):
    """With few active adapters, a task saved anew into the served bundle (before its reload) fails
    its sha256 check on a cold read: a JSON error naming the file, not a bare 'Internal Server Error'."""
    from mtpeft import MultiTaskModel
    from mtpeft.adapter_cache import AdapterStore

    support_model(tiny_bert(tokenizer)).save(tmp_path / "bundle")
    model = MultiTaskModel(tiny_bert(tokenizer))
    store = AdapterStore.from_bundle(model, tmp_path / "bundle", capacity=1)
    app = create_app(model, store=store, settings=ServeSettings(max_wait_ms=1), admin_root=tmp_path / "bundle")
    retrained = support_model(tiny_bert(tokenizer))
    retrained.heads["sentiment"].out.bias.data += 1.0
    retrained.save(tmp_path / "bundle", tasks=["sentiment"])
    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.post("/v1/predict", json={"input": "hi", "task": "sentiment"})
    assert response.status_code == 500 and response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert "sentiment/" in detail and "changed since the bundle was saved" in detail, detail
    assert str(tmp_path) not in detail  # paths relative to the admin root
