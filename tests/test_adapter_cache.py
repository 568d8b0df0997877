"""AdapterStore: many registered tasks, an LRU of active ones, cold loads off the model lock."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_bert

from mtpeft import MultiTaskModel, TaskSpec, adapter_cache
from mtpeft.adapter_cache import AdapterStore
from mtpeft.config import LoraSettings
from mtpeft.storage import BundleIntegrityError, read_task, save_bundle
from mtpeft.tasks.spec import UnknownTaskError

N_TASKS = 50
TEXTS = ["great product", "it broke after a day", "fine, I guess", "where is my parcel"]


def _spec(i: int) -> TaskSpec:
    if i % 5 == 4:  # some regression tasks among the classifiers
        return TaskSpec(name=f"t{i:02d}", type="regression", label_range=[0, 5], max_length=16)
    return TaskSpec(name=f"t{i:02d}", type="classification", labels=["a", "b", "c"][: 2 + i % 2], max_length=16)


def _tasks_on(model: MultiTaskModel, n: int, seed: int) -> MultiTaskModel:
    """``model`` with tasks t00.. t{n-1}: random non-zero adapters (so mixing them up would show), fp32."""
    for i in range(n):
        model.add_task(_spec(i), LoraSettings(r=2, alpha=4))
    torch.manual_seed(seed)
    for layer in model.lora_layers().values():
        for task in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[task].weight, std=0.5)
    model.bf16 = False
    return model


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    """A model holding all 50 tasks (random non-zero adapters) and their saved bundle."""
    model = _tasks_on(MultiTaskModel(tiny_bert(tokenizer)), N_TASKS, seed=1)
    bundle = tmp_path_factory.mktemp("many") / "bundle"
    save_bundle(model, bundle)
    return model, bundle


def _store(tokenizer, bundle, capacity=5, **kwargs) -> AdapterStore:
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.bf16 = False
    return AdapterStore.from_bundle(model, bundle, capacity=capacity, **kwargs)


def _same(got, want) -> None:
    got, want = got.to_dict(), want.to_dict()
    assert got.keys() == want.keys() and got["task"] == want["task"]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-5) if not isinstance(value, str) else got[key] == value, key


def test_every_task_predicts_as_a_model_holding_it_permanently(reference, tokenizer):
    model, bundle = reference
    store = _store(tokenizer, bundle, capacity=5)
    assert len(store.specs) == N_TASKS and store.model.task_names == []  # registered, none active yet
    tasks = [f"t{i:02d}" for i in range(N_TASKS) for _ in TEXTS]
    inputs = TEXTS * N_TASKS
    want = model.predict(inputs, task=tasks)
    got = store.predict(inputs, task=tasks)  # one mixed call: 10 passes of 5 tasks each
    for g, w in zip(got, want):
        _same(g, w)
    assert len(store.model.task_names) == 5 and store.stats.misses == N_TASKS
    for i in (7, 31, 7):  # one task at a time, cold and warm
        name = f"t{i:02d}"
        for g, w in zip(store.predict(TEXTS, task=name), model.predict(TEXTS, task=name)):
            _same(g, w)


def test_inputs_given_no_task_are_routed_as_a_model_routes_them(reference, tokenizer):
    from mtpeft.predictions import NoTaskPrediction
    from mtpeft.router import RouteDecision

    model, bundle = reference
    store = _store(tokenizer, bundle, capacity=2)
    unrouted = store.predict("great product")  # 50 tasks take a text: the shape rule cannot choose
    assert isinstance(unrouted, NoTaskPrediction) and "50 tasks take a text input" in unrouted.reason

    class ToT07:
        def route(self, inputs):
            return [RouteDecision("t07", 0.9, [("t07", 0.9)], "router") for _ in inputs]

    store.router = ToT07()
    got = store.predict(TEXTS[:2] + TEXTS[:1], task=[None, None, "t31"])  # an explicit task still wins
    for g, w in zip(got, model.predict(TEXTS[:2], task="t07") + [model.predict(TEXTS[0], task="t31")]):
        _same(g, w)


def test_least_recently_used_task_is_evicted(reference, tokenizer):
    store = _store(tokenizer, reference[1], capacity=3)
    for name in ("t00", "t01", "t02"):
        store.ensure_active([name])
    store.ensure_active(["t00"])  # t00 is now the most recently used
    assert store.active_tasks == ["t01", "t02", "t00"]
    store.ensure_active(["t03"])
    assert store.active_tasks == ["t02", "t00", "t03"]
    assert sorted(store.model.task_names) == ["t00", "t02", "t03"]
    assert (store.stats.hits, store.stats.misses, store.stats.evictions) == (1, 4, 1)


def test_eviction_never_removes_a_task_of_the_current_batch(reference, tokenizer):
    store = _store(tokenizer, reference[1], capacity=3)
    store.ensure_active(["t00", "t01", "t02"])
    store.ensure_active(["t00", "t03", "t04"])  # t00 is the least recently used, but this batch needs it
    assert sorted(store.model.task_names) == ["t00", "t03", "t04"]
    with pytest.raises(ValueError, match="capacity=3"):
        store.ensure_active(["t05", "t06", "t07", "t08"])
    assert sorted(store.model.task_names) == ["t00", "t03", "t04"]  # a refused batch changes nothing
    with store.active(["t05", "t06"]) as model:  # held for the block: rows of both tasks in one pass
        assert {"t05", "t06"} <= set(model.task_names)
        model.predict(TEXTS[:2], task=["t05", "t06"])


def test_a_task_held_by_an_active_block_is_not_evicted_by_a_call_inside_it(reference, tokenizer):
    # The model lock is re-entrant: a predict inside ``with store.active([...])`` on the same
    # thread evicted the block's own task, which then was missing from the model it yielded.
    model, bundle = reference
    store = _store(tokenizer, bundle, capacity=2)
    store.ensure_active(["t00", "t01"])
    with store.active(["t01"]) as held:
        for g, w in zip(store.predict(TEXTS, task="t02"), model.predict(TEXTS, task="t02")):
            _same(g, w)
        assert "t01" in held.specs  # t00 was evicted for t02, not the held t01
        with pytest.raises(ValueError, match="held by an enclosing"):
            store.ensure_active(["t03", "t04"])  # both fit only by evicting t01
        assert "t01" in held.specs
        held.predict(TEXTS[0], task="t01")
    store.ensure_active(["t03", "t04"])  # released at the block's end
    assert sorted(store.model.task_names) == ["t03", "t04"]


def test_a_bundle_with_a_name_already_registered_registers_none_of_its_tasks(reference, tokenizer, tmp_path):
    # It registered the bundle's tasks up to the clash, so registering it again once the clash
    # was removed failed on those (already registered).
    model, bundle = reference
    store = _store(tokenizer, bundle, capacity=2)
    extra = MultiTaskModel(tiny_bert(tokenizer))
    extra.add_task(TaskSpec(name="new-a", type="classification", labels=["x", "y"]), LoraSettings(r=2, alpha=4))
    extra.add_task(TaskSpec(name="t10", type="classification", labels=["x", "y"]), LoraSettings(r=2, alpha=4))
    extra.add_task(TaskSpec(name="new-b", type="classification", labels=["x", "y"]), LoraSettings(r=2, alpha=4))
    save_bundle(extra, tmp_path / "extra")
    with pytest.raises(ValueError, match="'t10' .* is already registered"):
        store.register_bundle(tmp_path / "extra")
    assert not {"new-a", "new-b"} & set(store.specs)
    store.unregister("t10")
    assert sorted(store.register_bundle(tmp_path / "extra")) == ["new-a", "new-b", "t10"]


def test_concurrent_cold_loads_read_each_task_once(reference, tokenizer, monkeypatch):
    model, bundle = reference
    store = _store(tokenizer, bundle, capacity=8)
    reads, release = [], threading.Event()
    real_read = adapter_cache.read_task

    def slow_read(folder, *args):
        reads.append(folder.name)
        if folder.name == "t10":
            assert release.wait(30)  # t10's read stays in flight until the other tasks are read
        return real_read(folder, *args)

    monkeypatch.setattr(adapter_cache, "read_task", slow_read)
    names = ["t10", "t10", "t11", "t12", "t13", "t11"]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(store.predict, TEXTS, task=names[0])]
        while "t10" not in reads:
            threading.Event().wait(0.01)
        futures += [pool.submit(store.predict, TEXTS, task=name) for name in names[1:]]
        for _ in range(1000):  # other cold tasks load while t10's read is in flight
            if {"t11", "t12", "t13"} <= set(reads):
                break
            threading.Event().wait(0.01)
        assert not futures[0].done() and not futures[1].done()
        release.set()
        results = [f.result(timeout=30) for f in futures]
    assert sorted(reads) == ["t10", "t11", "t12", "t13"]  # the second t10 waited for the first read
    for name, got in zip(names, results):
        for g, w in zip(got, model.predict(TEXTS, task=name)):
            _same(g, w)


def test_a_cold_load_does_not_block_other_tasks(reference, tokenizer, monkeypatch):
    store = _store(tokenizer, reference[1], capacity=4)
    store.ensure_active(["t01"])
    release, reading = threading.Event(), threading.Event()
    real_read = adapter_cache.read_task

    def stuck_read(folder, *args):
        reading.set()
        release.wait(30)
        return real_read(folder, *args)

    monkeypatch.setattr(adapter_cache, "read_task", stuck_read)
    with ThreadPoolExecutor(2) as pool:
        cold = pool.submit(store.predict, TEXTS, task="t20")
        assert reading.wait(10)
        warm = pool.submit(store.predict, TEXTS, task="t01")
        try:
            assert len(warm.result(timeout=10)) == len(TEXTS)  # served while t20's files are being read
            assert not cold.done()
        finally:
            release.set()
        assert len(cold.result(timeout=30)) == len(TEXTS)


def test_tasks_out_of_memory_are_read_again_from_disk(reference, tokenizer, monkeypatch):
    store = _store(tokenizer, reference[1], capacity=1, keep_in_memory=False)
    reads = []
    real_read = adapter_cache.read_task
    monkeypatch.setattr(adapter_cache, "read_task", lambda folder, *a: reads.append(folder.name) or real_read(folder, *a))
    for name in ("t00", "t01", "t00"):
        store.predict(TEXTS[0], task=name)
    assert reads == ["t00", "t01", "t00"] and store.memory_bytes() == 0
    kept = _store(tokenizer, reference[1], capacity=1)
    for name in ("t00", "t01", "t00"):
        kept.predict(TEXTS[0], task=name)
    held = sum(read_task(reference[1] / name).nbytes() for name in ("t00", "t01"))
    assert kept.memory_bytes() == held and kept.stats.evictions == 2


def test_registered_from_memory_and_pinned_tasks(reference, tokenizer):
    model, bundle = reference
    own = MultiTaskModel(tiny_bert(tokenizer))
    own.bf16 = False
    own.add_task(TaskSpec(name="own", type="classification", labels=["x", "y"]))
    store = AdapterStore(own, capacity=1)
    assert store.pinned_tasks == ["own"]  # tasks the model already held stay
    store.register_saved(read_task(bundle / "t03"))
    store.register(bundle / "t04")
    store.predict(TEXTS, task="t03")
    store.predict(TEXTS, task="t04")
    assert sorted(own.task_names) == ["own", "t04"]
    got = store.predict(TEXTS, task="t03")  # evicted, back from the CPU copy
    for g, w in zip(got, model.predict(TEXTS, task="t03")):
        _same(g, w)
    store.pin(["t04"])
    store.predict(TEXTS, task=["t03", "t04", "own", "t03"])  # capacity 1 is enough: t04 and own are pinned
    assert sorted(own.task_names) == ["own", "t03", "t04"]
    with pytest.raises(ValueError, match="already registered"):
        store.register(bundle / "t03")
    store.unregister("t03")
    assert "t03" not in own.task_names and "t03" not in store.specs


def test_a_task_that_does_not_fit_is_not_left_pinned(reference, tokenizer):
    # It was marked pinned before it was added: the failed add left a "pinned" task that was
    # never active, so each later predict failed as an unknown task of the model.
    import dataclasses

    store = AdapterStore(MultiTaskModel(tiny_bert(tokenizer)), capacity=2)
    saved = read_task(reference[1] / "t03")
    store.register_saved(dataclasses.replace(saved, head={k: v[:1] for k, v in saved.head.items()}))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="size mismatch"):
            store.pin(["t03"])
        assert store.pinned_tasks == [] and "t03" not in store.model.specs
    with pytest.raises(RuntimeError, match="size mismatch"):
        store.predict(TEXTS[0], task="t03")


def test_bad_input_fails_clearly(reference, tokenizer, tmp_path):
    store = _store(tokenizer, reference[1], capacity=2)
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
        store.predict(TEXTS[0], task="nope")
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        AdapterStore(store.model, capacity=0)
    # A file changed after the bundle was saved is caught when the task is first read.
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(reference[1], copy)
    head = copy / "t05" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-1] + b"\x00")
    tampered = _store(tokenizer, copy, capacity=2)
    with pytest.raises(BundleIntegrityError, match="t05/head.safetensors"):
        tampered.predict(TEXTS[0], task="t05")
    assert tampered.predict(TEXTS[0], task="t06").task == "t06"  # the store keeps serving
    with pytest.raises(BundleIntegrityError):  # and does not pretend t05 loaded
        tampered.predict(TEXTS[0], task="t05")


def test_server_serves_registered_tasks_with_few_active(tokenizer, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from tiny_bundle import path_backbone, saved_backbone

    from mtpeft.serve import ServeSettings, load_server

    backbone_dir = saved_backbone(tmp_path / "backbone", tokenizer)
    on_disk = _tasks_on(MultiTaskModel(path_backbone(backbone_dir)), 12, seed=2)  # a backbone loaded by path
    save_bundle(on_disk, tmp_path / "bundle")
    app = load_server(tmp_path / "bundle", settings=ServeSettings(max_wait_ms=1), max_active_adapters=3)
    app.state.model.bf16 = False
    store = app.state.store
    with TestClient(app) as client:
        assert client.get("/healthz").json()["tasks"] == 12
        names = [f"t{i:02d}" for i in (0, 5, 9, 0, 11, 2)]
        response = client.post("/v1/predict", json={"inputs": TEXTS[:2] * 3, "task": names})
        assert response.status_code == 200, response.text
        want = on_disk.predict(TEXTS[:2] * 3, task=names)
        for result, w in zip(response.json()["results"], want):
            assert result["prediction"]["task"] == w.task
            assert result["prediction"]["score"] == pytest.approx(w.score, abs=1e-5)
        assert len(store.model.task_names) == 3
        assert client.post("/v1/predict", json={"input": "x", "task": "t99"}).status_code == 422


def test_a_server_with_few_active_starts_on_a_bundle_of_no_tasks(tokenizer, tmp_path):
    # Its tasks come later (the admin API); the backbone is named in the manifest alone.
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from tiny_bundle import path_backbone, saved_backbone

    from mtpeft.serve import ServeSettings, load_server

    backbone_dir = saved_backbone(tmp_path / "backbone", tokenizer)
    MultiTaskModel(path_backbone(backbone_dir)).save(tmp_path / "empty")
    app = load_server(tmp_path / "empty", settings=ServeSettings(max_wait_ms=1), max_active_adapters=3)
    with TestClient(app) as client:
        assert client.get("/healthz").json()["tasks"] == 0
        assert client.get("/v1/tasks").json()["tasks"] == []
        assert client.post("/v1/predict", json={"input": "x", "task": "t00"}).status_code == 422
