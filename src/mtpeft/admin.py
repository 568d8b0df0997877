"""Load, reload and unload a running server's tasks without restarting it.

Off unless the server's environment holds an API key (``MTPEFT_API_KEY``); a request
then passes it as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``::

    POST   /v1/admin/tasks                 {"path": "tickets"}     add a task saved in a bundle
    POST   /v1/admin/tasks/{name}/reload   {"path": "v2"} or {}    a new version of a loaded task
    DELETE /v1/admin/tasks/{name}                                  unload a task

Paths are relative to the admin root (the served bundle unless ``--admin-root`` says
otherwise); one that resolves outside it, links followed, is refused. Only tasks whose
files a bundle manifest lists are read, each file checked against its sha256 as it is read
(``storage.read_task``), and only safetensors.

Why a swap is atomic for requests in flight: the files are read and checked off the model
thread; the swap itself (take the old version out, add the new one) is one job on the
model thread, the only thread that runs forward passes, so it lands between two batches
and every batch sees the old version or the new one, never neither. The new version is
first tried under a spare name in the same job; if it does not fit, nothing changes. The
event loop never reads the task dict the model thread changes, but a ``TaskView``
published after each change.
A request queued for a task that is unloaded before its batch runs gets a 422 (unknown task).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from mtpeft.router import task_shape
from mtpeft.schemas import AdminResult, ErrorOut, TaskLoadRequest, TaskReloadRequest
from mtpeft.storage import (
    ADAPTER_WEIGHTS,
    BUNDLE_FILE,
    HEAD_WEIGHTS,
    TASK_FILE,
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
    from mtpeft.adapter_cache import AdapterStore
    from mtpeft.examples import Example
    from mtpeft.model import MultiTaskModel

API_KEY_ENV = "MTPEFT_API_KEY"
PROBE = "mtpeft-admin-probe"  # the spare task name a new task is tried under before it is swapped in


class ManagementError(Exception):
    """A refused management request; ``status`` is the HTTP status it is answered with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TaskChangedError(ValueError):
    """A queued request's task now takes another kind of input (unloaded and loaded anew)."""


class TaskView(Mapping):
    """The model's tasks as the event loop may read them: copies, replaced whole after a change.

    Every method reads one snapshot, which is never changed after it is published, so a
    reader on another thread never sees a task dict in the middle of a change.
    """

    def __init__(self, served: MultiTaskModel | AdapterStore) -> None:
        self.publish(snapshot(served))

    def publish(self, state: tuple[dict[str, TaskSpec], dict[str, dict]]) -> None:
        self._state = state

    def __getitem__(self, name: str) -> TaskSpec:
        return self._state[0][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state[0])

    def __len__(self) -> int:
        return len(self._state[0])

    def __contains__(self, name: object) -> bool:
        return name in self._state[0]

    def get(self, name, default=None):
        return self._state[0].get(name, default)

    def keys(self):
        return self._state[0].keys()

    def items(self):
        return self._state[0].items()

    def values(self):
        return self._state[0].values()

    def metrics(self, name: str) -> dict:
        return self._state[1].get(name, {})


def snapshot(served: MultiTaskModel | AdapterStore) -> tuple[dict[str, TaskSpec], dict[str, dict]]:
    """The served tasks' specs and metrics as new dicts; taken on the model thread."""
    return dict(served.specs), {name: dict(served.task_metrics.get(name, {})) for name in served.specs}


def _same_outputs(old: TaskSpec, new: TaskSpec) -> bool:
    return (old.type, old.is_pair, old.labels, old.label_range) == (new.type, new.is_pair, new.labels, new.label_range)


class TaskManager:
    """Task management for one served model.

    Args:
        model: the served model.
        executor: the one-thread executor every forward pass runs on.
        view: the ``TaskView`` the app reads tasks from; republished after each change.
        root: the folder request paths are relative to; ``None``: loading is off.
        api_key: the key requests must carry; ``None``: management is off.
        pinned: tasks other parts of the server rely on (the support pipeline), with why;
            they cannot be unloaded, and a reload must keep their type and labels.
        store: when the server keeps only some tasks active (``AdapterStore``), tasks are
            registered there instead of added to the model.
        keep_active: tasks the store keeps active whenever they are loaded, as at start-up
            (a learned router's classes: it picks only among the tasks in ``model.specs``).
    """

    def __init__(self, model: MultiTaskModel, executor: Executor, view: TaskView,
                 root: str | os.PathLike | None = None, api_key: str | None = None,
                 pinned: dict[str, str] | None = None, store: AdapterStore | None = None,
                 keep_active: Iterable[str] = ()) -> None:
        self.model, self.executor, self.view, self.store = model, executor, view, store
        self.served = model if store is None else store
        self.root = Path(root).resolve() if root is not None else None
        self.api_key = api_key or None
        self.pinned = dict(pinned or {})
        self.keep_active = set(keep_active)
        self._busy = threading.Lock()  # one management request at a time, whichever event loop it comes from

    # ----------------------------------------------------------------- requests

    async def load(self, path: str, task: str | None = None) -> dict:
        with self._exclusive():
            started = time.perf_counter()
            saved, source = await run_in_threadpool(self._read, path, task)
            name = saved.spec.name
            if name in self.view:
                raise ManagementError(409, f"task {name!r} is already loaded; POST /v1/admin/tasks/{name}/reload "
                                           "swaps in a new version")
            await self._on_model_thread(self._swap, None, saved)
            return self._result("loaded", name, source, started)

    async def reload(self, name: str, path: str | None = None) -> dict:
        """Swap in a new version of ``name``: by default the one saved in the admin root's bundle."""
        with self._exclusive():
            started = time.perf_counter()
            old = self.view.get(name)
            if old is None:
                raise ManagementError(404, f"task {name!r} is not loaded; loaded tasks: {sorted(self.view)}")
            saved, source = await run_in_threadpool(self._read, path or ".", name)
            new = saved.spec
            if new.name != name:
                raise ManagementError(422, f"{source} holds task {new.name!r}, not {name!r}")
            if task_shape(new) != task_shape(old):
                raise ManagementError(409, f"the new {name!r} takes {task_shape(new)} inputs, the loaded one "
                                           f"{task_shape(old)} inputs; unload it and load the new one instead")
            if name in self.pinned and not _same_outputs(old, new):
                raise ManagementError(409, f"task {name!r} is {self.pinned[name]}: a new version must keep its type "
                                           f"and labels ({old.type}, {old.labels})")
            await self._on_model_thread(self._swap, name, saved)
            return self._result("reloaded", name, source, started)

    async def unload(self, name: str) -> dict:
        with self._exclusive():
            started = time.perf_counter()
            if name not in self.view:
                raise ManagementError(404, f"task {name!r} is not loaded; loaded tasks: {sorted(self.view)}")
            if name in self.pinned:
                raise ManagementError(409, f"task {name!r} is {self.pinned[name]} and cannot be unloaded")
            await self._on_model_thread(self._remove, name)
            return self._result("unloaded", name, None, started)

    def check(self, items: list[tuple[str, Example]]) -> None:
        """On the model thread, before a batch: every row's task is loaded and takes the row's kind of input."""
        specs = self.served.specs
        for task, example in items:
            spec = specs.get(task)
            if spec is None:
                raise UnknownTaskError(f"unknown task {task!r}: it was unloaded while the request waited; "
                                       f"known tasks: {sorted(specs)}")
            if (example.text_pair is None) != (task_shape(spec) == "text"):
                raise TaskChangedError(f"task {task!r} was replaced by one that takes {task_shape(spec)} inputs "
                                       "while the request waited")

    # ----------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise ManagementError(409, "another management request is running; retry when it is done")
        try:
            yield
        finally:
            self._busy.release()

    async def _on_model_thread(self, job, *args) -> None:
        """Run a change on the model thread and publish the tasks it leaves (also when it fails)."""
        loop = asyncio.get_running_loop()
        try:
            state = await loop.run_in_executor(self.executor, job, *args)
        except BaseException:
            self.view.publish(await loop.run_in_executor(self.executor, snapshot, self.served))
            raise
        self.view.publish(state)

    def _swap(self, name: str | None, saved: SavedTask):
        """Model thread: add ``saved``, in place of the loaded ``name`` when given; on failure nothing changes."""
        served = self.served
        if name is not None and name not in served.specs:
            raise ManagementError(404, f"task {name!r} was unloaded meanwhile")
        if name is None and saved.spec.name in served.specs:
            raise ManagementError(409, f"task {saved.spec.name!r} was loaded meanwhile")
        self._probe(saved)
        if self.store is None:
            if name is not None:
                self.model.remove_task(name)
            install_task(self.model, saved)
        else:
            new = saved.spec.name
            pinned = name in self.store.pinned_tasks or new in self.keep_active
            if name is not None:
                self.store.unregister(name)
            self.store.register_saved(saved)
            if pinned:
                self.store.pin([new])
        return snapshot(served)

    def _probe(self, saved: SavedTask) -> None:
        """Add ``saved`` under a spare name and take it out again: the adapter and head must fit the model."""
        if PROBE in self.model.specs:
            raise ManagementError(409, f"a task is named {PROBE!r}, the name kept for checking new tasks")
        probe = SavedTask(dataclasses.replace(saved.spec, name=PROBE), saved.lora, saved.adapter, saved.head,
                          saved.record, saved.source)
        try:
            install_task(self.model, probe)  # leaves the model as it was when it fails
        except Exception as err:
            raise ManagementError(422, f"{saved.source}: does not fit the served model: {err}") from err
        self.model.remove_task(PROBE)

    def _remove(self, name: str):
        if name not in self.served.specs:
            raise ManagementError(404, f"task {name!r} was unloaded meanwhile")
        if self.store is None:
            self.model.remove_task(name)
        else:
            self.store.unregister(name)
        return snapshot(self.served)

    def _result(self, action: str, name: str, source: str | None, started: float) -> dict:
        return {"action": action, "task": name, "source": source, "tasks": sorted(self.view),
                "seconds": round(time.perf_counter() - started, 4)}

    def relative(self, message: str) -> str:
        """``message`` with the admin root's absolute path left out: clients name paths relative to it,
        and the server's layout is not theirs to see (the storage layer's errors name full paths)."""
        if self.root is None:
            return message
        return message.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")

    def _inside_root(self, path: Path, shown: str) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ManagementError(403, f"{shown!r} is outside the admin root; paths are relative to it")
        return resolved

    def _read(self, path: str, task: str | None) -> tuple[SavedTask, str]:
        """Worker thread: the task at ``path`` (a task folder in a bundle, or a bundle and ``task``), read and checked."""
        if self.root is None:
            raise ManagementError(409, "this server has no admin root to load tasks from; "
                                       "start it with `mtpeft serve BUNDLE` or pass admin_root")
        if "\x00" in path:
            raise ManagementError(422, "the path holds a NUL character")
        try:
            target = self._inside_root(self.root / path, path)
            if not target.is_dir():
                raise ManagementError(404, f"{path!r}: no such folder under the admin root")
            folder, digests = self._locate(target, path, task)
        except (OSError, UnicodeError) as err:  # a name too long, a lone surrogate, an unreadable folder
            raise ManagementError(422, f"{path!r}: unusable path ({getattr(err, 'strerror', None) or err})") from err
        shown = folder.relative_to(self.root).as_posix()
        try:
            record = read_task_record(folder, digests)
            spec = TaskSpec.from_dict(record["spec"])
            if task is not None and spec.name != task:
                raise ManagementError(422, f"{shown!r} holds task {spec.name!r}, not {task!r}")
            if spec.name == PROBE:  # loaded, it would stop every later load and reload from being tried
                raise ManagementError(422, f"{shown!r} holds task {PROBE!r}, the name kept for checking new tasks; "
                                           "save it under another name")
            self.model.identity.check_matches(record["backbone"], f"task {spec.name!r} in {shown!r}")
            needed = [TASK_FILE, HEAD_WEIGHTS] + ([ADAPTER_WEIGHTS] if record.get("adapter") else [])
            unlisted = [name for name in needed if name not in digests]
            if unlisted:
                raise ManagementError(422, f"{shown!r}: the bundle manifest lists no sha256 for {unlisted}; "
                                           "save the task into the bundle again")
            for name in needed:
                self._inside_root(folder / name, f"{shown}/{name}")
            return read_task(folder, digests, record), shown
        except ManagementError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # unreadable, changed, not a JSON
            # object (AttributeError), or not a task of this backbone
            raise ManagementError(422, f"{shown!r}: {err}") from err

    def _locate(self, target: Path, shown: str, task: str | None) -> tuple[Path, dict[str, str]]:
        """The task folder at ``target`` and the sha256 its bundle manifest lists per file."""
        if (target / TASK_FILE).is_file():  # a task folder: its bundle is the folder above
            bundle = target.parent
            digests = None
            if target != self.root and (bundle / BUNDLE_FILE).is_file():
                entries = self._entries(bundle, shown)
                digests = next((d for folder, d in entries if folder.resolve() == target), None)
            if digests is None:
                raise ManagementError(422, f"{shown!r} is not part of a bundle: only tasks that a bundle.json lists "
                                           "with their sha256 are loaded (save with model.save(BUNDLE, tasks=[...]))")
            return target, digests
        if not (target / BUNDLE_FILE).is_file():
            raise ManagementError(404, f"{shown!r}: neither a task folder ({TASK_FILE}) nor a bundle ({BUNDLE_FILE})")
        try:
            tasks = read_json(target / BUNDLE_FILE).get("tasks", {})
            if not isinstance(tasks, dict):
                raise ValueError(f"'tasks' must map task names to folders, not {type(tasks).__name__}")
        except (OSError, ValueError, AttributeError) as err:  # AttributeError: not a JSON object
            raise ManagementError(422, f"{shown!r}: unreadable {BUNDLE_FILE}: {err}") from err
        if task is None:
            if len(tasks) != 1:
                raise ManagementError(422, f"{shown!r} holds tasks {sorted(tasks)}; say which one with 'task'")
            task = next(iter(tasks))
        if task not in tasks:
            raise ManagementError(404, f"the bundle {shown!r} has no task {task!r}; it holds {sorted(tasks)}")
        wanted = self._inside_root(target / str(tasks[task]), f"{shown}/{tasks[task]}")
        for folder, digests in self._entries(target, shown):
            if folder.resolve() == wanted:
                return wanted, digests
        raise ManagementError(422, f"the bundle {shown!r} lists task {task!r} in a folder it does not hold")

    @staticmethod
    def _entries(bundle: Path, shown: str) -> list[tuple[Path, dict[str, str]]]:
        try:
            return bundle_entries(bundle)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # also a manifest of the wrong shape
            raise ManagementError(422, f"{shown!r}: its bundle manifest is unusable: {err}") from err


# --------------------------------------------------------------------- HTTP

_bearer = HTTPBearer(auto_error=False, description=f"the key in the server's {API_KEY_ENV}")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description=f"the key in the server's {API_KEY_ENV}")
_ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 422)}


def admin_routes(manager: TaskManager) -> APIRouter:
    """The management endpoints; each checks the key first, so without one they answer 404."""

    async def authorized(bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
                         key: Annotated[str | None, Security(_key_header)]) -> None:
        if manager.api_key is None:
            raise HTTPException(404, f"task management is off: start the server with {API_KEY_ENV} set to enable it")
        given = bearer.credentials if bearer is not None else key
        if not given or not hmac.compare_digest(given.encode(), manager.api_key.encode()):
            raise HTTPException(401, "task management needs the server's API key: 'Authorization: Bearer <key>' "
                                     "or 'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})

    routes = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(authorized)], responses=_ERRORS)

    async def answer(operation) -> dict:
        try:
            return await operation
        except ManagementError as err:
            raise HTTPException(err.status, manager.relative(str(err))) from None

    @routes.post("/tasks", response_model=AdminResult)
    async def load_task(request: TaskLoadRequest) -> dict:
        """Add a task saved in a bundle under the admin root."""
        return await answer(manager.load(request.path, request.task))

    @routes.post("/tasks/{name}/reload", response_model=AdminResult)
    async def reload_task(name: str, request: TaskReloadRequest | None = None) -> dict:
        """Swap in a new version of a loaded task (by default from the served bundle), between two batches."""
        return await answer(manager.reload(name, request.path if request is not None else None))

    @routes.delete("/tasks/{name}", response_model=AdminResult)
    async def unload_task(name: str) -> dict:
        """Unload a task; requests still queued for it get a 422."""
        return await answer(manager.unload(name))

    return routes
