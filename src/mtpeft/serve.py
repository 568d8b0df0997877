"""The HTTP server: every task of a bundle from one process, behind one micro-batcher.

``create_app(model, router, support, settings)`` builds a FastAPI app; ``serve(...)`` runs
it with uvicorn (``mtpeft serve BUNDLE``). A request's path: limits -> task (explicit, else
the router) -> ``to_example`` (a malformed input is a 422, never a 500) -> the batcher,
which joins rows of all concurrent requests into one ``model.run`` on the model thread.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtpeft.adapter_cache import AdapterStore, serving_store
from mtpeft.admin import API_KEY_ENV, TaskChangedError, TaskManager, TaskView, admin_routes
from mtpeft.batcher import MicroBatcher, Overloaded
from mtpeft.data import is_blank
from mtpeft.embeddings import embed_texts
from mtpeft.examples import Example
from mtpeft.model import MultiTaskModel, to_example
from mtpeft.predictions import AnswerPrediction
from mtpeft.router import (NO_TASK, LearnedRouter, Router, ShapeRouter, decide, input_shape, routing_texts,
                           task_shape)
from mtpeft.runtime import bound_kernel_caches
from mtpeft.schemas import (ErrorOut, Health, InputItem, PairInput, PredictRequest, PredictResponse, QAInput,
                            SupportRequest, SupportResponse, TasksResponse, TextInput)
from mtpeft.storage import BundleIntegrityError
from mtpeft.support import SupportPipeline
from mtpeft.tasks.spec import UnknownTaskError

log = logging.getLogger("mtpeft.serve")
# What a prediction request may be refused with, for the OpenAPI schema (the default 422 shape is FastAPI's, not ours).
ERRORS = {400: {"model": ErrorOut, "description": "a body that cannot be decoded (not UTF-8)"},
          413: {"model": ErrorOut, "description": "request body over max_body_bytes"},
          422: {"model": ErrorOut, "description": "malformed input, a limit exceeded, or an unknown task"},
          503: {"model": ErrorOut, "description": "overloaded, too slow, or shutting down; see Retry-After"}}


@dataclass
class ServeSettings:
    """Batching and request limits.

    Attributes:
        max_wait_ms: longest a request waits for others to share its forward pass.
        max_batch_items: rows (inputs) per ``model.run`` call.
        batch_size: rows per forward pass inside ``model.run``.
        max_inputs: inputs per ``/v1/predict`` request.
        max_text_chars: characters per text, pair member, question or support message.
        max_context_chars: characters per QA context (longer: contexts are split into windows).
        max_body_bytes: request body size.
        max_queued: requests waiting for the model; beyond it: 503 with Retry-After.
        request_timeout_s: longest a prediction may take; beyond it: 503.
        drain_timeout_s: at shutdown, longest to wait for requests already accepted
            (new ones get 503 meanwhile).
    """

    max_wait_ms: float = 2.0
    max_batch_items: int = 256
    batch_size: int = 64
    max_inputs: int = 64
    max_text_chars: int = 2000
    max_context_chars: int = 20000
    max_body_bytes: int = 1_000_000
    max_queued: int = 1024
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        # Each of these at 0 (or below) started a server that refused every request (413, 422 or 503).
        for name in ("max_batch_items", "batch_size", "max_inputs", "max_text_chars", "max_context_chars",
                     "max_body_bytes", "max_queued"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.request_timeout_s > 0:  # NaN too
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        for name in ("max_wait_ms", "drain_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class JSONOut(JSONResponse):
    """JSON that always encodes: a lone surrogate echoed from a request (JSON can carry one,
    UTF-8 cannot) goes back as its JSON escape instead of failing the response with a 500."""

    def render(self, content) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")


class Metrics:
    """Prometheus metrics in the app's own registry (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mtpeft_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("mtpeft_request_seconds", "HTTP request latency", ["endpoint"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_rows = Histogram("mtpeft_batch_rows", "inputs per model.run call", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_requests = Histogram("mtpeft_batch_requests", "requests joined in one model.run call",
                                        registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.predictions = Counter("mtpeft_predictions", "predictions per task", ["task"], registry=self.registry)
        self.routes = Counter("mtpeft_routes", "routing decisions", ["source", "task"], registry=self.registry)


class Admission:
    """Which HTTP requests are being answered, and whether new ones are still taken (not while draining)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests; wait at most ``timeout_s`` for those in flight; returns how many are left."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return self.in_flight


# The status a request cancelled before its answer is counted under (nginx's "client closed request").
CANCELLED = 499

FastHandler = Callable[[bytes], Awaitable[Response | None]]


class LimitsAndMetrics:
    """Outermost ASGI layer: 503 while draining, 413 for bodies over the limit (chunked ones too),
    per-request metrics, and the hot routes' fast path.

    ``fast_routes`` maps ``(method, path)`` to ``(route, handler)``: a JSON body for such a route
    goes to ``handler(body)`` directly, skipping FastAPI's routing, dependency solving and response
    validation (measured: 0.35 -> 0.25 ms of CPU per ``/v1/predict`` request in-process, which
    under load is CPU the model does not get). The handler returns ``None`` for a body it does
    not take (malformed, invalid), which then goes the full way for FastAPI's usual answer.
    """

    def __init__(self, app, max_body_bytes: int, metrics: Metrics, admission: Admission,
                 fast_routes: dict[tuple[str, str], tuple[object, FastHandler]] | None = None) -> None:
        self.app, self.max_body_bytes, self.metrics, self.admission = app, max_body_bytes, metrics, admission
        self.fast_routes = fast_routes or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.admission.draining:
            response = JSONResponse({"detail": "the server is shutting down"}, 503, headers={"Retry-After": "1"})
            await response(scope, receive, send)
            self.metrics.requests.labels("unmatched", "503").inc()
            return
        self.admission.in_flight += 1
        try:
            await self._call(scope, receive, send)
        finally:
            self.admission.in_flight -= 1

    async def _call(self, scope, receive, send) -> None:
        started, status = time.perf_counter(), [None]  # None: no answer started

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        body, size, more = [], 0, True
        while more:  # read the body up front: requests are small and limited
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                response = JSONResponse({"detail": f"request body over max_body_bytes={self.max_body_bytes}"}, 413)
                await response(scope, receive, send_status)
                self.metrics.requests.labels("unmatched", "413").inc()
                return
        body = b"".join(body)
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_again():
            return replay.pop() if replay else await receive()

        try:
            fast = self.fast_routes.get((scope["method"], scope["path"]))
            if fast is not None and _is_json(scope):
                scope["route"] = fast[0]
                response = await fast[1](body)
                if response is not None:
                    return await response(scope, receive_again, send_status)
            await self.app(scope, receive_again, send_status)
        except asyncio.CancelledError:  # the client or the server went away first: nothing was sent, no 500
            status[0] = status[0] or CANCELLED
            raise
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")  # the route template: few label values
            self.metrics.requests.labels(endpoint, str(status[0] or 500)).inc()  # 500: an error raised
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _is_json(scope) -> bool:
    """Whether the request says its body is JSON (FastAPI reads other bodies as bytes, not JSON)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


def _plain(value: InputItem):
    """A validated request input as ``MultiTaskModel`` takes it."""
    if isinstance(value, QAInput):
        return {"question": value.question, "context": value.context}
    if isinstance(value, PairInput):
        return (value.text, value.text_pair)
    if isinstance(value, TextInput):
        return value.text
    return tuple(value) if isinstance(value, list) else value


def _check_texts(i: int, value, settings: ServeSettings) -> None:
    """422 for blank texts (a model would still answer them, confidently) and texts over the limits."""
    texts = routing_texts(value)  # the text, both texts of a pair, or a QA question
    context = value["context"] if input_shape(value) == "qa" else None
    if any(is_blank(text) for text in texts + ([context] if context is not None else [])):
        raise HTTPException(422, f"inputs[{i}]: empty text")
    if context is not None and len(context) > settings.max_context_chars:
        raise HTTPException(422, f"inputs[{i}]: context has {len(context)} characters, "
                                 f"over max_context_chars={settings.max_context_chars}")
    for text in texts:
        if len(text) > settings.max_text_chars:
            raise HTTPException(422, f"inputs[{i}]: a text has {len(text)} characters, "
                                     f"over max_text_chars={settings.max_text_chars}")


def _all_finite(value) -> bool:
    """Whether every number in a prediction is finite: JSON has no NaN, and one means broken weights."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def _finite(value):
    """``value`` with NaN and infinities (which Python's json reads from a request, and field
    errors echo back) as strings: strict JSON has no token for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _where(loc) -> str:
    """A field's place for a message: ``input.str``, not pydantic's ``input.function-after[_unicode(), str]``."""
    return ".".join(re.sub(r"function-after\[\w+\(\), ([^\]]+)\]", r"\1", str(part)) for part in loc)


# What each member of an input's union (schemas.InputItem) takes, by pydantic's name for it.
INPUT_FORMS = {"str": "a text", "QAInput": '{"question", "context"}', "PairInput": '{"text", "text_pair"}',
               "TextInput": '{"text"}', "list[str]": "a [text, text] pair"}
TYPE_ERRORS = ("string_type", "model_type", "model_attributes_type", "list_type", "dict_type")


def validation_detail(errors: list[dict]) -> str:
    """A request's validation errors in a sentence: malformed JSON with its reason (pydantic says
    only "JSON decode error" at a character offset), and an input that fits no form of the union
    by the form it comes closest to, not by each form's complaint (the useful one came fifth)."""
    lines, unions = [], {}
    for error in errors:
        loc = [_where([part]) for part in error["loc"][1:]]  # without "body"
        if error["type"] == "json_invalid":
            lines.append(f"invalid JSON at character {loc[0] if loc else 0}: {error.get('ctx', {}).get('error', '')}")
            continue
        branch = 1 if loc[:1] == ["input"] else 2 if loc[:1] == ["inputs"] and len(loc) > 1 else None
        if branch is not None and len(loc) > branch and loc[branch] in INPUT_FORMS:
            unions.setdefault(".".join(loc[:branch]), {}).setdefault(loc[branch], []).append((loc[branch + 1:], error))
            continue
        lines.append(f"{'.'.join(loc) or 'body'}: {error['msg']}")
    for where, forms in unions.items():
        near = {form: found for form, found in forms.items()
                if not (len(found) == 1 and not found[0][0] and found[0][1]["type"] in TYPE_ERRORS)}
        if not near:
            *forms_but_last, last = INPUT_FORMS.values()
            lines.append(f"{where}: expected {', '.join(forms_but_last)} or {last}")
            continue
        form, found = min(near.items(), key=lambda item: len(item[1]))
        lines.append(f"{where} (as {INPUT_FORMS[form]}): "
                     + "; ".join(f"{'.'.join(field) + ': ' if field else ''}{e['msg']}" for field, e in found))
    more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
    return "; ".join(lines[:3]) + more


def page_html() -> str:
    return (resources.files("mtpeft") / "resources" / "web" / "index.html").read_text(encoding="utf-8")


def create_app(model: MultiTaskModel, router: Router | None = None, support: SupportPipeline | None = None,
               settings: ServeSettings | None = None, store: AdapterStore | None = None,
               admin_root: str | os.PathLike | None = None, api_key: str | None = None,
               executor: ThreadPoolExecutor | None = None) -> FastAPI:
    """An app serving ``model``'s tasks; ``router`` defaults to ``model.router`` (a loaded bundle's
    learned router), else the shape rule; ``support`` enables ``/v1/support``.

    With ``store``, the app serves every task registered there, keeping the hot ones active in ``model``.
    The task management endpoints (``mtpeft.admin``) load from ``admin_root`` and need ``api_key``
    (default: the ``MTPEFT_API_KEY`` environment variable); without a key they are off.
    """
    settings = settings or ServeSettings()
    tasks_of = model if store is None else store  # specs, spec(), task_metrics and run() of the tasks served
    view = TaskView(tasks_of)  # what the event loop reads about tasks; the model thread changes tasks_of
    router = router or (model.router if store is None else None)  # as model.predict routes
    if router is None or isinstance(router, ShapeRouter):
        router = ShapeRouter(view)
    metrics = Metrics()
    executor = executor or model_thread()  # the model thread
    pinned = {} if support is None else dict.fromkeys(
        (support.sentiment_task, support.similarity_task, support.qa_task), "used by /v1/support")
    # A store pins the learned router's tasks (serving_store): one loaded later must be pinned too.
    manager = TaskManager(model, executor, view, admin_root,
                          os.environ.get(API_KEY_ENV) if api_key is None else api_key, pinned, store,
                          keep_active=getattr(router, "classes", ()))
    admission = Admission()

    def on_batch(rows: int, requests: int) -> None:
        metrics.batch_rows.observe(rows)
        metrics.batch_requests.observe(requests)

    def run_batch(items):  # on the model thread, where tasks change too
        manager.check(items)
        return tasks_of.run(items, batch_size=settings.batch_size)

    batcher = MicroBatcher(run_batch, executor, settings.max_wait_ms, settings.max_batch_items, on_batch,
                           settings.max_queued)

    async def predict_rows(items):
        """The batcher's predictions; 503 (with Retry-After) when overloaded or too slow, 422 when
        a task was unloaded (or replaced by one of another input shape) while the request waited."""
        try:
            return await asyncio.wait_for(batcher.submit(items), settings.request_timeout_s)
        except Overloaded as err:
            raise HTTPException(503, f"server busy: {err}", headers={"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            raise HTTPException(503, f"prediction took over request_timeout_s={settings.request_timeout_s}",
                                headers={"Retry-After": "1"}) from None
        except (UnknownTaskError, TaskChangedError) as err:
            raise HTTPException(422, str(err)) from None

    async def on_model_thread(fn, *args):
        """``fn(*args)`` on the model thread, or a 503 when it does not get there and back in request_timeout_s."""
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(executor, fn, *args),
                                          settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"the model thread did not answer within request_timeout_s={settings.request_timeout_s}",
                                headers={"Retry-After": "1"}) from None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        admission.draining = False
        yield
        # Shutdown: answer what was accepted (bounded), refusing new requests with 503 meanwhile.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.drain_timeout_s
        requests_left = await admission.drain(settings.drain_timeout_s)
        queued_left = await batcher.drain(max(0.0, deadline - loop.time()))
        if requests_left or queued_left:
            log.warning("shutting down with %d requests unanswered after drain_timeout_s=%s (%d queued for the model)",
                        requests_left, settings.drain_timeout_s, queued_left)
        await batcher.close()
        executor.shutdown(wait=False)

    app = FastAPI(title="mtpeft", version="0.1.0", lifespan=lifespan, default_response_class=JSONOut,
                  description="Many task adapters on one frozen backbone: predictions, routing and customer support.")
    app.state.model, app.state.router, app.state.support = model, router, support
    app.state.batcher, app.state.metrics, app.state.settings = batcher, metrics, settings
    app.state.store, app.state.tasks, app.state.manager, app.state.admission = store, view, manager, admission

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        return JSONOut({"detail": f"invalid request: {validation_detail(errors)}",
                        "errors": _finite(jsonable_encoder(errors))}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONOut({"detail": err.detail}, err.status_code, headers=err.headers)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        kind = "learned" if isinstance(router, LearnedRouter) else "shape"
        return Health(status="ok", tasks=len(view), router=kind, support=support is not None)

    @app.get("/v1/tasks", response_model=TasksResponse)
    async def tasks() -> dict:
        learned = isinstance(router, LearnedRouter)
        return {"tasks": [{"name": name, "type": spec.type, "input": task_shape(spec), "labels": spec.labels,
                           "description": spec.description, "metrics": view.metrics(name)}
                          for name, spec in view.items()],
                "router": {"kind": "learned" if learned else "shape", "threshold": getattr(router, "threshold", None),
                           "classes": getattr(router, "classes", [])},
                "support": support is not None}

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(request: PredictRequest) -> dict:
        if (request.input is None) == (request.inputs is None):
            raise HTTPException(422, "pass exactly one of 'input' (one input) or 'inputs' (a list)")
        values = [_plain(request.input)] if request.inputs is None else [_plain(v) for v in request.inputs]
        if not values:
            raise HTTPException(422, "'inputs' is empty")
        if len(values) > settings.max_inputs:
            raise HTTPException(422, f"{len(values)} inputs, over max_inputs={settings.max_inputs} per request")
        for i, value in enumerate(values):
            _check_texts(i, value, settings)
        tasks = request.task
        if isinstance(tasks, list) and len(tasks) != len(values):
            raise HTTPException(422, f"{len(tasks)} task names for {len(values)} inputs")
        for name in [tasks] if isinstance(tasks, str) else tasks or []:
            if name is not None and name not in view:
                raise HTTPException(422, f"unknown task {name!r}; known tasks: {sorted(view)}")
        needs_router = tasks is None or (isinstance(tasks, list) and None in tasks)
        if needs_router and not isinstance(router, ShapeRouter):  # the learned router runs the backbone
            decisions = await on_model_thread(decide, values, tasks, router)
        else:
            decisions = decide(values, tasks, router)
        results, items, where, shapes = [], [], [], []
        for i, (value, decision) in enumerate(zip(values, decisions)):
            result = {"task": decision.task, "route": decision.to_dict(), "prediction": None, "error": None}
            results.append(result)
            if decision.task is None:
                result["error"] = f"no task matched: {decision.reason}"
                continue
            spec = view.get(decision.task)
            if spec is None:  # routed (on the model thread) just before an unload reached the view
                raise HTTPException(422, f"unknown task {decision.task!r}; known tasks: {sorted(view)}")
            try:
                example = to_example(value, spec)
            except ValueError as err:
                if decision.source == "explicit":
                    raise HTTPException(422, f"inputs[{i}]: {err}") from None
                result["error"] = f"routed to {decision.task!r} (p={decision.confidence:.2f}), which needs another input: {err}"
                continue
            items.append((decision.task, example))
            where.append(i)
            shapes.append(task_shape(spec))
        if store is not None:  # read cold tasks' files here, off the model thread
            await prefetch([task for task, _ in items])
        for i, shape, prediction in zip(where, shapes, await predict_rows(items)):
            # The model thread's check tells a text from a two-part input, not a QA context from a
            # second sentence: a QA task unloaded and a pair task loaded under its name meanwhile
            # would answer this QA input with a label.
            if (shape == "qa") != isinstance(prediction, AnswerPrediction):
                raise HTTPException(422, f"inputs[{i}]: task {prediction.task!r} was replaced, while the request "
                                         f"waited, by one that does not take {shape} inputs")
            results[i]["prediction"] = prediction.to_dict()
            if not _all_finite(results[i]["prediction"]):
                raise HTTPException(500, f"inputs[{i}]: task {prediction.task!r} gave a non-finite score "
                                         "(NaN or infinity): its adapter, head or backbone weights are broken")
        # counted once the request is answered: a rejected one (422, 500) routed and predicted nothing
        for decision in decisions:
            metrics.routes.labels(decision.source, decision.task or NO_TASK).inc()  # no task can be named "(none)"
        for i in where:
            metrics.predictions.labels(results[i]["task"]).inc()
        return {"results": results}

    async def prefetch(tasks: list[str]) -> None:
        """``store.prefetch``; a task found missing in the moment a reload swaps it is asked for again.

        A cold task whose files changed since the server registered them (saved anew into the
        bundle, not reloaded yet) is refused by their sha256: a 500 that says so, not a bare one.
        """
        for attempt in range(50):
            try:
                return await run_in_threadpool(store.prefetch, tasks)
            except UnknownTaskError as err:
                if attempt == 49 or not all(task in view for task in tasks):
                    raise HTTPException(422, str(err)) from None
                await asyncio.sleep(0.01)
            except (BundleIntegrityError, OSError) as err:
                raise HTTPException(500, f"a task's saved files cannot be read: {manager.relative(str(err))}; "
                                         "reload the task to serve its files as they are now") from None

    @app.post("/v1/support", response_model=SupportResponse, responses={404: {"model": ErrorOut}, **ERRORS})
    async def support_reply(request: SupportRequest) -> dict:
        if support is None:
            raise HTTPException(404, "no support pipeline: start the server on a bundle with sentiment, similar-question "
                                     "and QA tasks (and --faq FILE)")
        if len(request.message) > settings.max_text_chars:
            raise HTTPException(422, f"message has {len(request.message)} characters, over max_text_chars={settings.max_text_chars}")
        if is_blank(request.message):
            raise HTTPException(422, "the message is empty")
        loop = asyncio.get_running_loop()

        def run(items):  # from the worker thread, through the batcher on the event loop, with its 503s and 422s
            return asyncio.run_coroutine_threadsafe(predict_rows(items), loop).result()

        def embed(texts, **options):  # the query, and the FAQ entries when an edited FAQ is re-indexed
            # One model-thread job per batch of 64: a whole FAQ in one job could outlast request_timeout_s
            # every time (never re-indexed), and would hold up every prediction until it was done.
            parts = [asyncio.run_coroutine_threadsafe(on_model_thread(functools.partial(
                embed_texts, model, texts[start:start + 64], **options)), loop).result()
                for start in range(0, len(texts), 64)]
            return torch.cat(parts) if parts else embed_texts(model, texts, **options)

        reply = await run_in_threadpool(support.answer, request.message, run=run, embed=embed, top_k=request.top_k)
        metrics.predictions.labels(support.sentiment_task).inc()
        metrics.predictions.labels(support.similarity_task).inc(len(reply.similar))  # one per FAQ question re-ranked
        metrics.predictions.labels(support.qa_task).inc()
        return reply.to_dict()

    @app.get("/metrics", responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html()

    app.include_router(admin_routes(manager))

    async def predict_fast(body: bytes) -> Response | None:
        try:  # what FastAPI does with the body: json.loads, then validation in python mode
            request = PredictRequest.model_validate(json.loads(body))
        except (ValueError, RecursionError):  # undecodable, not JSON, nested too deep, or invalid (pydantic's
            return None                        # ValidationError is a ValueError): FastAPI gives its 400 or 422
        try:
            return JSONOut(await predict(request))
        except HTTPException as err:
            return JSONOut({"detail": err.detail}, err.status_code, headers=err.headers)

    predict_route = next(route for route in app.routes if getattr(route, "path", None) == "/v1/predict")
    app.add_middleware(LimitsAndMetrics, max_body_bytes=settings.max_body_bytes, metrics=metrics, admission=admission,
                       fast_routes={("POST", "/v1/predict"): (predict_route, predict_fast)})
    return app


def load_server(bundle: str | os.PathLike, faq: str | os.PathLike | None = None, backbone: str | None = None,
                settings: ServeSettings | None = None, support_tasks: tuple[str, str, str] | None = None,
                max_active_adapters: int | None = None, admin_root: str | os.PathLike | None = None) -> FastAPI:
    """An app for a saved bundle: its router (else the shape rule), and the support pipeline
    when the bundle holds the support tasks (the packaged FAQ unless ``faq`` names one).
    Task management loads from ``admin_root`` (default: the bundle).

    ``max_active_adapters`` registers every task but keeps at most that many in the model
    (``AdapterStore``); the router's and support pipeline's tasks stay active.
    """
    bound_kernel_caches()  # before the model's first matmul: memory stays flat over many batch shapes
    executor = model_thread()
    build = functools.partial(_build_server, bundle, faq, backbone, settings, support_tasks, max_active_adapters,
                              admin_root, executor)
    return executor.submit(build).result()  # loaded on the thread that will run it


def model_thread() -> ThreadPoolExecutor:
    """The one thread of a serving process that runs torch.

    OpenMP keeps a thread team per thread that calls into it, and two teams on the same cores
    spin against each other: measured on the 2-core CPU, one short text took 9 ms when only
    one thread had ever run torch and 18 ms, on either thread, once a second one had. So the
    model is loaded, warmed up and run on this thread alone.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtpeft-model")


def _build_server(bundle, faq, backbone, settings, support_tasks, max_active_adapters, admin_root,
                  executor: ThreadPoolExecutor) -> FastAPI:
    from mtpeft.router import ShapeRouter

    if max_active_adapters is None:
        model = MultiTaskModel.load(bundle, backbone=backbone)  # with the bundle's learned router, if any
        store, router = None, None  # create_app takes model.router: the bundle's, else the shape rule
    else:
        store, router = serving_store(bundle, max_active_adapters, backbone)
        model = store.model
    names = support_tasks or ("sentiment", "similar-questions", "faq-answer")
    if store is not None and all(name in store.specs for name in names):
        store.pin(names)
    support = None
    if all(name in model.specs for name in names):
        support = SupportPipeline(model, faq, *names)
    elif faq is not None:
        raise ValueError(f"--faq needs the support tasks {list(names)} in the bundle; it holds {model.task_names}")
    app = create_app(model, router, support, settings, store, admin_root=bundle if admin_root is None else admin_root,
                     executor=executor)
    warm_up(model, (settings or ServeSettings()).batch_size)
    return app


def warm_up(model: MultiTaskModel, batch_size: int = 64) -> None:
    """Run each task at a few common batch sizes and at its largest batch: the first requests
    do not pay for kernel selection, and the memory high-water mark is reached at start-up,
    not by the first long batch hours later (freed memory stays in the process for reuse,
    see ``mtpeft.runtime.tune_allocator``)."""
    for task in model.task_names:
        spec = model.spec(task)
        short = Example(text="warm up", text_pair="warm up" if spec.text_pair_column else None)
        for rows in (1, 8, batch_size):
            model.run([(task, short)] * rows, batch_size=batch_size)
        long_text = " ".join(["warm"] * spec.max_length)  # truncated to max_length tokens
        if spec.type == "extractive-qa":  # a short question, a context that fills the window
            longest = Example(text="warm up?", text_pair=long_text)
        else:
            longest = Example(text=long_text, text_pair=long_text if spec.text_pair_column else None)
        model.run([(task, longest)] * batch_size, batch_size=batch_size)


def serve(bundle: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    import uvicorn

    app = load_server(bundle, **kwargs)
    # uvicorn stops taking connections and waits for open ones; then the lifespan drains the rest.
    uvicorn.run(app, host=host, port=port, log_level="info",
                timeout_graceful_shutdown=app.state.settings.drain_timeout_s)
