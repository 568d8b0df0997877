"""Many registered tasks, few active ones: an LRU cache of adapters in a ``MultiTaskModel``.

A model holds every task it serves as live modules, which is fine for tens of tasks and
wasteful for a thousand of which a few are hot. ``AdapterStore`` knows every registered
task (a saved folder, read lazily, or its weights as CPU tensors) and keeps at most
``capacity`` of them in the model, evicting the least recently used ones that the current
batch does not need.

Locks: a cold task's files are read (and their sha256 checked) outside the model lock, so
other tasks keep being served meanwhile; only adding the read weights to the model and the
forward passes themselves hold it::

    store = AdapterStore.from_bundle(MultiTaskModel.from_backbone(), "runs/many", capacity=256)
    store.predict(["great!", "awful"], task=["reviews-17", "reviews-912"])
    store.run([(task, example), ...])          # any mix of registered tasks, in input order
    with store.active(["reviews-17"]):         # the tasks stay in the model inside the block
        store.model.predict("great!", task="reviews-17")

Adapters are served as saved: an evicted task's in-model weights are dropped, not written back.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtpeft.model import ModelInput, MultiTaskModel, answer_routed
from mtpeft.predictions import NoTaskPrediction, Prediction
from mtpeft.storage import (
    BUNDLE_FILE,
    SavedTask,
    bundle_entries,
    install_task,
    read_json,
    read_task,
    read_task_record,
)
from mtpeft.tasks import TaskSpec
from mtpeft.tasks.spec import UnknownTaskError

if TYPE_CHECKING:
    from mtpeft.router import Router

# 256 active LoRA r=8 MiniLM tasks hold ~90 MB; against 64, the 1,000-task Zipf stream of
# benchmarks/adapter_cache.py misses half as often (759 against 1,557 loads per 4,096 rows).
DEFAULT_CAPACITY = 256


@dataclass
class _Entry:
    """A registered task: where its weights come from and, when read, the weights."""

    spec: TaskSpec
    record: dict
    folder: Path | None = None  # None: registered from memory, ``state`` is the only copy
    digests: dict[str, str] = field(default_factory=dict)
    state: SavedTask | None = None


@dataclass
class StoreStats:
    """Counters since the store was made; ``load_seconds`` sums cold reads (off the model lock)
    and ``install_seconds`` the time spent adding tasks under the model lock."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    install_seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class AdapterStore:
    """Every registered task of one model, with at most ``capacity`` of them active in it.

    Args:
        model: the model whose backbone every task shares. Tasks it already holds are
            registered as pinned: always active, never evicted.
        capacity: most tasks active at once besides the pinned ones.
        keep_in_memory: keep a task's weights as CPU tensors once read, so a later cold
            load skips the disk; ``False`` keeps only the folder of a saved task.

    ``router``: where ``predict`` sends an input given no task (a ``LearnedRouter`` over
    pinned tasks); ``None``: the one registered task that takes the input's shape.
    """

    def __init__(self, model: MultiTaskModel, capacity: int = DEFAULT_CAPACITY, keep_in_memory: bool = True) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 active task, got {capacity}")
        self.model, self.capacity, self.keep_in_memory = model, capacity, keep_in_memory
        self.specs: dict[str, TaskSpec] = dict(model.specs)  # every registered task; read-only for callers
        self.task_metrics: dict[str, dict] = {n: model.task_metrics.get(n, {}) for n in model.specs}
        self.stats = StoreStats()
        self.router: Router | None = None
        self._entries: dict[str, _Entry] = {}
        self._pinned: set[str] = set(model.specs)
        self._lru: OrderedDict[str, None] = OrderedDict()  # active, unpinned; least recently used first
        # Tasks an ``active`` block holds (by how many blocks): the model lock is re-entrant, so a
        # call inside a block, on its thread, must not evict them.
        self._held: Counter[str] = Counter()
        self._model_lock = threading.RLock()  # model changes and forward passes
        self._lock = threading.Lock()  # the registry and the reads in flight
        self._reading: dict[str, Future] = {}

    @classmethod
    def from_bundle(cls, model: MultiTaskModel, path: str | os.PathLike, capacity: int = DEFAULT_CAPACITY,
                    keep_in_memory: bool = True) -> AdapterStore:
        """A store with every task of the bundle (or task folder) at ``path`` registered, none active yet."""
        store = cls(model, capacity, keep_in_memory)
        store.register_bundle(path)
        return store

    # ----------------------------------------------------------------- registry

    def register_bundle(self, path: str | os.PathLike) -> list[str]:
        """Register every task of a bundle; only their ``task.json`` files are read now.

        All or none: one task that cannot be registered (its name taken, another backbone, an
        unreadable task.json) leaves the others out too, so the bundle can be registered again
        once that is fixed.
        """
        return self._add(*(self._read_entry(folder, digests) for folder, digests in bundle_entries(path)))

    def register(self, folder: str | os.PathLike, digests: dict[str, str] | None = None) -> str:
        """Register a saved task folder; its weights are read on first use, checked against
        ``digests`` ({file name: sha256}, from a bundle manifest) when given."""
        return self._add(self._read_entry(folder, digests))[0]

    @staticmethod
    def _read_entry(folder: str | os.PathLike, digests: dict[str, str] | None) -> tuple[_Entry, str]:
        folder = Path(folder)
        record = read_task_record(folder, digests)
        spec = TaskSpec.from_dict(record["spec"])
        return _Entry(spec, record, folder, dict(digests or {})), f"in {folder}"

    def register_saved(self, saved: SavedTask) -> str:
        """Register a task from CPU tensors (``storage.read_task``'s form); they stay in memory."""
        return self._add((_Entry(saved.spec, saved.record, state=saved), f"from {saved.source}"))[0]

    def _add(self, *entries: tuple[_Entry, str]) -> list[str]:
        """Register ``entries`` together: if one cannot be (another backbone, a name taken), none is."""
        for entry, where in entries:
            self.model.identity.check_matches(entry.record["backbone"], f"task {entry.spec.name!r} {where}")
        names = [entry.spec.name for entry, _ in entries]
        with self._lock:
            for i, (name, (_, where)) in enumerate(zip(names, entries)):
                if name in self.specs or name in names[:i]:
                    raise ValueError(f"task {name!r} {where} is already registered")
            for name, (entry, _) in zip(names, entries):
                self._entries[name] = entry
                self.task_metrics[name] = entry.record.get("metrics", {})
                self.specs[name] = entry.spec
        return names

    def unregister(self, name: str) -> None:
        """Forget a task, removing it from the model if it is active."""
        self.spec(name)
        with self._model_lock:
            if name in self.model.specs:
                self.model.remove_task(name)
            with self._lock:
                self._lru.pop(name, None)
                self._pinned.discard(name)
                self._entries.pop(name, None)
                self.specs.pop(name)
                self.task_metrics.pop(name, None)

    def spec(self, name: str) -> TaskSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise UnknownTaskError(f"unknown task {name!r}; registered tasks: {sorted(self.specs) or 'none'}") from None

    @property
    def active_tasks(self) -> list[str]:
        """Unpinned active tasks, least recently used first."""
        with self._lock:
            return list(self._lru)

    @property
    def pinned_tasks(self) -> list[str]:
        return sorted(self._pinned)

    def memory_bytes(self) -> int:
        """Bytes of adapter and head tensors the store holds in CPU memory (not the model's copies)."""
        with self._lock:
            return sum(e.state.nbytes() for e in self._entries.values() if e.state is not None)

    # ----------------------------------------------------------------- reading

    def prefetch(self, tasks: Iterable[str]) -> None:
        """Read the weights of the tasks that are neither active nor in memory, without the model lock.

        Concurrent calls for one task share one read; reads of different tasks run in parallel
        (file reads and hashing release the GIL).
        """
        names = list(dict.fromkeys(tasks))
        for name in names:
            self.spec(name)
        waits: list[Future] = []
        mine: list[tuple[str, _Entry, Future]] = []
        with self._lock:
            for name in names:
                entry = self._entries.get(name)
                if entry is None or entry.state is not None or name in self._lru:
                    continue  # pinned, in memory, or active
                if name in self._reading:
                    waits.append(self._reading[name])
                else:
                    future = Future()
                    self._reading[name] = future
                    mine.append((name, entry, future))
        error = None
        for name, entry, future in mine:
            started = time.perf_counter()
            try:
                state = read_task(entry.folder, entry.digests, entry.record)
                if state.spec.name != name:
                    raise ValueError(f"{entry.folder}: holds task {state.spec.name!r}, registered as {name!r}")
            except Exception as err:  # noqa: BLE001 - every waiter hears of it; the first one is raised here too
                with self._lock:
                    self._reading.pop(name, None)
                future.set_exception(err)
                error = error or err
                continue
            with self._lock:
                entry.state = state
                self._reading.pop(name, None)
                self.stats.load_seconds += time.perf_counter() - started
            future.set_result(None)
        if error is not None:
            raise error
        for future in waits:
            future.result()

    # ----------------------------------------------------------------- activation

    def ensure_active(self, tasks: Iterable[str]) -> None:
        """Make ``tasks`` active, evicting least recently used tasks that are not among them.

        The guarantee holds until another thread activates tasks; to run a forward pass
        on them, use ``active`` (or ``run``), which also holds the model lock.
        """
        with self.active(tasks):
            pass

    @contextlib.contextmanager
    def active(self, tasks: Iterable[str]) -> Iterator[MultiTaskModel]:
        """Hold ``tasks`` active, and the model lock, for the block; yields the model."""
        names = list(dict.fromkeys(tasks))
        for attempt in range(3):
            self.prefetch(names)  # outside the model lock
            self._model_lock.acquire()
            try:
                if self._activate(names, read_if_missing=attempt == 2):
                    break
            except BaseException:
                self._model_lock.release()
                raise
            self._model_lock.release()  # an evicted task lost its weights since the prefetch: read again
        with self._lock:
            self._held.update(names)
        try:
            yield self.model
        finally:
            with self._lock:
                self._held -= Counter(names)
            self._model_lock.release()

    def _activate(self, names: list[str], read_if_missing: bool) -> bool:
        """Under the model lock: add the missing tasks; ``False`` if one's weights are gone again."""
        with self._lock:
            wanted = [n for n in names if n not in self._pinned]
            if len(wanted) > self.capacity:
                raise ValueError(f"a batch of {len(wanted)} tasks does not fit capacity={self.capacity} active tasks; "
                                 f"raise the capacity or split the batch (run() splits it)")
            held = [n for n in self._held if n in self._lru and n not in wanted]
            if len(wanted) + len(held) > self.capacity:
                raise ValueError(f"tasks {wanted} do not fit capacity={self.capacity} beside {sorted(held)}, held by an "
                                 f"enclosing `active` block on this thread; raise the capacity or call outside it")
            missing = [n for n in wanted if n not in self._lru]
            keep = set(wanted) | set(self._held)
            if not read_if_missing and any(self._entries[n].state is None for n in missing):
                return False
            for name in wanted:
                if name in self._lru:
                    self._lru.move_to_end(name)
            self.stats.hits += len(wanted) - len(missing)
            self.stats.misses += len(missing)
        if read_if_missing:
            self.prefetch(missing)
        for name in missing:
            self._evict_for_one(keep)
            started = time.perf_counter()
            with self._lock:
                entry = self._entries[name]
                state = entry.state
                if not self.keep_in_memory and entry.folder is not None:
                    entry.state = None  # the model holds it now; an eviction drops it for good
            install_task(self.model, state)
            with self._lock:
                self._lru[name] = None
                self.stats.install_seconds += time.perf_counter() - started
        return True

    def _evict_for_one(self, keep: set[str]) -> None:
        """Remove least recently used tasks outside ``keep`` until one more task fits."""
        while True:
            with self._lock:
                if len(self._lru) < self.capacity:
                    return
                victim = next(n for n in self._lru if n not in keep)  # exists: wanted and held fit capacity
                del self._lru[victim]
                self.stats.evictions += 1
            self.model.remove_task(victim)

    def pin(self, tasks: Iterable[str]) -> None:
        """Make ``tasks`` active for good (e.g. those a router or pipeline reads from ``model.specs``)."""
        names = list(dict.fromkeys(tasks))
        self.prefetch(names)
        with self._model_lock:
            for name in names:
                with self._lock:
                    if name in self._pinned:
                        continue
                    was_active = name in self._lru
                    state = self._entries[name].state
                if not was_active:
                    if state is None:
                        self.prefetch([name])
                        state = self._entries[name].state
                    install_task(self.model, state)  # pinned only once in the model: a misfit stays unpinned
                with self._lock:
                    self._pinned.add(name)
                    self._lru.pop(name, None)

    # ----------------------------------------------------------------- inference

    def run(self, items: Sequence[tuple[str, object]], batch_size: int = 64) -> list[Prediction]:
        """``MultiTaskModel.run`` over registered tasks: ``(task, Example)`` pairs, in input order.

        Items of more tasks than ``capacity`` go in several passes of at most ``capacity``
        tasks each, the already active tasks first.
        """
        if not items:
            return []
        by_task: dict[str, list[int]] = {}
        for i, (task, _) in enumerate(items):
            by_task.setdefault(task, []).append(i)
        for name in by_task:
            self.spec(name)
        with self._lock:
            pinned = [n for n in by_task if n in self._pinned]
            order = sorted((n for n in by_task if n not in self._pinned), key=lambda n: n not in self._lru)
        chunks = [order[i:i + self.capacity] for i in range(0, len(order), self.capacity)] or [[]]
        chunks[0] = pinned + chunks[0]
        results: list[Prediction | None] = [None] * len(items)
        for chunk in chunks:
            indices = sorted(i for name in chunk for i in by_task[name])
            with self.active(chunk) as model:
                predictions = model.run([items[i] for i in indices], batch_size=batch_size)
            for i, prediction in zip(indices, predictions):
                results[i] = prediction
        return results

    def predict(self, inputs: ModelInput | Sequence[ModelInput], task: str | Sequence[str | None] | None = None,
                batch_size: int = 64) -> Prediction | NoTaskPrediction | list[Prediction | NoTaskPrediction]:
        """``MultiTaskModel.predict`` over registered tasks: ``task`` names one task or one per input;
        an input given none goes where ``self.router`` sends it (``serving_store`` sets the
        bundle's learned router), else to the one registered task that takes its shape."""
        from mtpeft.router import ShapeRouter, decide

        single = isinstance(inputs, (str, tuple, dict))
        batch = [inputs] if single else list(inputs)
        decisions = decide(batch, task if task is None or isinstance(task, str) else list(task),
                           self.router or ShapeRouter(self.specs))
        predictions = answer_routed(batch, decisions, self.spec, self.run, batch_size)
        return predictions[0] if single else predictions

def serving_store(bundle: str | os.PathLike, capacity: int, backbone: str | os.PathLike | None = None):
    """``(store, router)`` for serving every task of ``bundle`` with at most ``capacity`` active.

    A learned router reads ``model.specs`` to know which tasks it may pick, so its tasks are
    pinned; without one, the shape rule looks at every registered task.
    """
    from mtpeft.router import LearnedRouter, ShapeRouter, load_router

    entries = bundle_entries(bundle)
    name = backbone
    if name is None:  # a bundle of no tasks (tasks come later through the admin API) names it in its manifest
        name = (read_task_record(*entries[0]) if entries else read_json(Path(bundle) / BUNDLE_FILE))["backbone"]["name"]
    store = AdapterStore(MultiTaskModel.from_backbone(name), capacity)
    for folder, digests in entries:
        store.register(folder, digests)
    router = load_router(bundle, store.model)
    if isinstance(router, LearnedRouter):
        store.pin(task for task in router.classes if task in store.specs)
        store.router = router
    else:
        router = ShapeRouter(store.specs)
    return store, router
