"""A micro-batcher: concurrent requests of any tasks share one mixed-task forward pass.

Requests queue up; the worker takes the first and, while other requests are in flight,
waits at most ``max_wait_ms`` for them (or until ``max_items`` rows), then runs them all in
one ``run`` call (``MultiTaskModel.run``) on a single model thread. While a batch runs, new
requests queue, so under load batches grow on their own, and a lone request on a quiet
server runs at once.

The model thread is the only thread that touches the model: adapter routing is state on
the backbone, so two concurrent forward passes would see each other's adapters.

Shutting down: ``drain`` waits, within a bound, until every submitted request is
answered; ``close`` then stops the worker and fails whatever still waits with
``Overloaded``, so no caller waits forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

Item = tuple[str, Any]  # (task, Example)


class Overloaded(RuntimeError):
    """More requests are waiting than the server accepts; the client should retry later."""


@dataclass
class _Request:
    items: Sequence[Item]
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Gather ``(task, example)`` rows from many requests into ``run`` calls.

    Args:
        run: runs a mixed list of rows and returns their predictions in order.
        executor: where ``run`` executes; pass a one-thread executor shared with every
            other use of the model.
        max_wait_ms: longest a request waits for others to join its batch.
        max_items: rows per ``run`` call; a request is never split.
        on_batch: called with ``(rows, requests)`` after each run (metrics).
        max_queued: requests that may wait; one more raises ``Overloaded`` at once, so an
            overloaded server sheds load instead of letting latency grow without bound.
    """

    def __init__(self, run: Callable[[list[Item]], list], executor: Executor, max_wait_ms: float = 2.0,
                 max_items: int = 256, on_batch: Callable[[int, int], None] | None = None,
                 max_queued: int = 1024) -> None:
        if max_wait_ms < 0 or max_items < 1:
            raise ValueError(f"max_wait_ms must be >= 0 and max_items >= 1, got {max_wait_ms}, {max_items}")
        self.run, self.executor = run, executor
        self.max_wait, self.max_items, self.on_batch = max_wait_ms / 1000.0, max_items, on_batch
        self.max_queued = max_queued
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._waiting = 0  # submit() calls not yet answered
        self._running: list[_Request] = []  # the batch being gathered or run
        self._carry: _Request | None = None  # a request that did not fit the last batch starts the next

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet answered (queued or in the running batch)."""
        return self._waiting

    async def submit(self, items: Sequence[Item]) -> list:
        """Predictions for ``items``, run together with whatever else is queued."""
        if not items:
            return []
        self._start()
        if self._queue.qsize() >= self.max_queued:
            raise Overloaded(f"{self._queue.qsize()} requests are already waiting (max_queued={self.max_queued})")
        future = asyncio.get_running_loop().create_future()
        self._waiting += 1
        try:
            await self._queue.put(_Request(list(items), future))
            return await future
        finally:
            self._waiting -= 1

    def _start(self) -> None:
        # Bound to the running loop; a new loop (a test client per request) gets a new worker.
        loop = asyncio.get_running_loop()
        if self._worker is None or self._loop is not loop or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._running, self._carry = [], None
            self._worker = loop.create_task(self._work())

    async def drain(self, timeout_s: float) -> int:
        """Wait until every submitted request is answered, at most ``timeout_s``; returns how many still wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._waiting and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return self._waiting

    async def close(self) -> None:
        """Stop the worker; requests still queued get ``Overloaded`` (the server is going away)."""
        if self._worker is not None and self._loop is asyncio.get_running_loop():
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            left = self._running + ([self._carry] if self._carry is not None else [])
            left += [self._queue.get_nowait() for _ in range(self._queue.qsize())]
            self._running, self._carry = [], None
            for request in left:
                _settle(request.future, error=Overloaded("the server shut down before this request was answered"))
        self._worker = None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._running = [self._carry or await self._queue.get()]
            self._carry = None
            rows = len(batch[0].items)
            deadline = loop.time() + self.max_wait
            # Gather only while other submitters are unanswered: a lone request (a quiet server)
            # runs at once instead of paying max_wait for company that is not coming. The count
            # still holds the callers of the batch just answered (they resume a loop turn later),
            # so a request queued behind a batch waits up to max_wait: under load those callers
            # are the clients most likely to send the next requests, and the batch grows.
            while rows < self.max_items and self._waiting > len(batch):
                if loop.time() >= deadline:
                    request = None if self._queue.empty() else self._queue.get_nowait()
                else:
                    request = await self._get(deadline - loop.time())
                if request is None:
                    break
                if rows + len(request.items) > self.max_items:
                    self._carry = request
                    break
                batch.append(request)
                rows += len(request.items)
            await self._run(batch)

    async def _get(self, timeout: float) -> _Request | None:
        """The next queued request within ``timeout`` seconds, else ``None``.

        Not ``asyncio.wait_for(queue.get())``: before Python 3.12, when a request arrives in the
        loop turn that ``close`` cancels the worker, it returns the request and swallows the
        cancellation, so the worker runs on and ``close`` never returns.
        """
        get = asyncio.ensure_future(self._queue.get())
        try:
            await asyncio.wait([get], timeout=timeout)
        except asyncio.CancelledError:
            if get.done() and not get.cancelled():
                self._running.append(get.result())  # already out of the queue: close() answers it
            get.cancel()
            raise
        if get.done():
            return get.result()
        get.cancel()  # a request it was about to take stays in the queue
        return None

    async def _run(self, batch: list[_Request]) -> None:
        batch = [request for request in batch if not request.future.done()]  # callers that gave up (timeout)
        if not batch:
            return
        items = [item for request in batch for item in request.items]
        loop = asyncio.get_running_loop()
        try:
            predictions = await loop.run_in_executor(self.executor, self.run, items)
        except Exception as err:
            if len(batch) > 1:  # keep one bad request from failing the others
                for request in batch:
                    await self._run([request])
                return
            _settle(batch[0].future, error=err)
            return
        if self.on_batch is not None:
            self.on_batch(len(items), len(batch))
        start = 0
        for request in batch:
            _settle(request.future, result=predictions[start:start + len(request.items)])
            start += len(request.items)


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
