"""MicroBatcher: batches form under load, never with max_batch = 1, the queue is bounded, failures stay local."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dualtoken.errors import CodesError
from dualtoken.serving import MicroBatcher, QueueFullError


class Recorder:
    """A process function that doubles its items and remembers the batches it saw."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate

    def __call__(self, items: list[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(list(items))
        if any(item < 0 for item in items):
            raise CodesError(f"negative item in {items}")
        if any(item == 13 for item in items):
            raise RuntimeError("unlucky")
        return [2 * item for item in items]


def test_concurrent_items_share_model_calls():
    process = Recorder()
    batcher = MicroBatcher("t", process, max_batch=4, max_wait_s=0.5, max_queue=16)
    futures = [batcher.submit(i) for i in range(8)]
    assert [f.result(5) for f in futures] == [2 * i for i in range(8)]
    assert process.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert batcher.batch_sizes == {4: 2}
    batcher.close()


def test_max_batch_one_turns_batching_off():
    process = Recorder()
    batcher = MicroBatcher("t", process, max_batch=1, max_wait_s=0.5, max_queue=16)
    futures = [batcher.submit(i) for i in range(5)]
    assert [f.result(5) for f in futures] == [0, 2, 4, 6, 8]
    assert process.batches == [[i] for i in range(5)]
    batcher.close()


def test_a_lone_request_waits_at_most_max_wait():
    batcher = MicroBatcher("t", Recorder(), max_batch=64, max_wait_s=0.05, max_queue=4)
    start = time.monotonic()
    assert batcher.submit(3).result(5) == 6
    assert time.monotonic() - start < 2.0
    batcher.close()


def test_full_queue_refuses_new_items():
    gate = threading.Event()
    process = Recorder(gate)
    batcher = MicroBatcher("t", process, max_batch=1, max_wait_s=0.0, max_queue=2)
    running = batcher.submit(0)
    deadline = time.monotonic() + 5
    while batcher.pending and time.monotonic() < deadline:  # the worker takes item 0 and blocks on the gate
        time.sleep(0.005)
    waiting = [batcher.submit(1), batcher.submit(2)]
    with pytest.raises(QueueFullError, match="queue is full"):
        batcher.submit(3)
    gate.set()
    assert [f.result(5) for f in [running, *waiting]] == [0, 2, 4]
    assert batcher.submit(4).result(5) == 8  # room again once the queue drained
    batcher.close()


def test_a_bad_item_fails_alone():
    process = Recorder()
    batcher = MicroBatcher("t", process, max_batch=3, max_wait_s=2.0, max_queue=8)
    good, bad, other = batcher.submit(1), batcher.submit(-1), batcher.submit(2)
    assert good.result(5) == 2 and other.result(5) == 4
    with pytest.raises(CodesError, match="negative"):
        bad.result(5)
    assert process.batches[0] == [1, -1, 2]  # tried together first, then one by one
    batcher.close()


def test_an_unexpected_error_reaches_every_request_and_the_worker_survives():
    batcher = MicroBatcher("t", Recorder(), max_batch=2, max_wait_s=0.3, max_queue=8)
    first, second = batcher.submit(13), batcher.submit(1)
    for future in (first, second):
        with pytest.raises(RuntimeError, match="unlucky"):
            future.result(5)
    assert batcher.submit(5).result(5) == 10
    batcher.close()


def test_cancelled_requests_cost_no_model_time():
    process = Recorder()
    # the batch waits for a fourth item, so the cancellation lands before the worker claims the requests
    batcher = MicroBatcher("t", process, max_batch=4, max_wait_s=0.5, max_queue=8)
    first, gone, last = batcher.submit(1), batcher.submit(2), batcher.submit(3)
    gone.cancel()
    assert first.result(5) == 2 and last.result(5) == 6
    assert process.batches == [[1, 3]]
    batcher.close()


def test_async_run_and_close():
    batcher = MicroBatcher("t", Recorder(), max_batch=8, max_wait_s=0.2, max_queue=8)

    async def many():
        return await asyncio.gather(*(batcher.run(i) for i in range(6)))

    assert asyncio.run(many()) == [0, 2, 4, 6, 8, 10]
    assert sum(size * count for size, count in batcher.batch_sizes.items()) == 6
    assert max(batcher.batch_sizes) > 1
    batcher.close()
    with pytest.raises(QueueFullError, match="shut down"):
        batcher.submit(1)
