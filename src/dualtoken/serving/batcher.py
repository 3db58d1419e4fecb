"""Micro-batching: concurrent requests of one kind are gathered into one model call, behind a bounded queue.

Each :class:`MicroBatcher` owns one worker thread and one bounded queue. The worker blocks for a first item, then
collects more for at most ``max_wait_s`` or until ``max_batch`` items, and calls ``process(items)`` once. Several
batchers share one lock, so the model runs one batch at a time whatever the kind. The batcher is independent of
any event loop (requests wait on ``concurrent.futures`` futures), so it works under uvicorn, the ASGI test client
and plain threads alike.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from ..errors import DualTokenError

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


class QueueFullError(RuntimeError):
    """The batcher's queue is full: the server answers 503 so that the client retries later."""


class MicroBatcher(Generic[T, R]):
    """Runs ``process`` (a list of items -> a list of results, same order) on micro-batches of submitted items."""

    def __init__(
        self,
        name: str,
        process: Callable[[list[T]], Sequence[R]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        model_lock: threading.Lock | None = None,
    ) -> None:
        self.name = name
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._process = process
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._model_lock = model_lock or threading.Lock()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        # how many model calls ran with each batch size (observability: benchmarks, tests)
        self.batch_sizes: Counter[int] = Counter()
        # requests taken from the queue and not yet answered
        self.running = 0

    @property
    def pending(self) -> int:
        """Items waiting in the queue (not counting the batch being processed)."""
        return self._queue.qsize()

    def submit(self, item: T) -> Future[R]:
        """Queue ``item``; raises :class:`QueueFullError` when ``max_queue`` items already wait."""
        if self._closed:
            raise QueueFullError(f"the {self.name} worker is shut down")
        self._ensure_worker()
        future: Future[R] = Future()
        try:
            self._queue.put_nowait((item, future))
        except queue.Full:
            raise QueueFullError(
                f"the {self.name} queue is full ({self.max_queue} requests waiting)"
            ) from None
        return future

    async def run(self, item: T) -> R:
        """Submit ``item`` and wait for its result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(item))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the batch it is running; items still queued are cancelled."""
        self._closed = True
        while True:
            try:
                _, future = self._queue.get_nowait()
            except queue.Empty:
                break
            future.cancel()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"dualtoken-{self.name}", daemon=True)
                self._thread.start()

    def _collect(self) -> tuple[list[tuple[T, Future[R]]], bool]:
        """Block for one item, then gather more until the batch is full or the wait is over. Returns (batch, stop)."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._collect()
            # a request whose client went away was cancelled: drop it before it costs model time
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.running = len(live)
            outcomes = self._run_batch([item for item, _ in live])
            self.running = 0  # before answering, so that an answered client never sees its request as running
            for (_, future), (result, error) in zip(live, outcomes, strict=True):
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)

    def _run_batch(self, items: list[T]) -> list[tuple[R | None, Exception | None]]:
        """(result, None) or (None, error) per item."""
        try:
            with self._model_lock:
                results = list(self._process(items))
            self.batch_sizes[len(items)] += 1
            return [(result, None) for result in results]
        except DualTokenError as exc:
            if len(items) == 1:
                return [(None, exc)]
            # one bad item must not fail its batch-mates: run them one by one
            return [self._run_batch([item])[0] for item in items]
        except Exception as exc:  # handed to every waiting request; the worker keeps serving
            return [(None, exc)] * len(items)
