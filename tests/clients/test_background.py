"""The one latest-only background thread shared by webhooks and checkpoint uploads."""

from __future__ import annotations

import threading

from lightning_lora.clients.background import LatestOnlyWorker


class _Gate:
    """A handler that records items and blocks on the first until released."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, item: str) -> None:
        self.started.set()
        self.release.wait(10)
        self.seen.append(item)


def test_latest_items_replace_each_other_and_queued_ones_keep_their_order() -> None:
    gate = _Gate()
    worker: LatestOnlyWorker[str] = LatestOnlyWorker(gate, "t", drain_on_close=True)
    assert worker.offer_latest("p0") == (True, None)
    assert gate.started.wait(5)  # p0 is being handled; what follows waits
    assert worker.offer_latest("p1") == (True, None)
    assert worker.offer_latest("p2") == (True, "p1")  # p1 superseded
    assert worker.put("done")  # p2 was posted before it: goes first
    assert worker.offer_latest("p3") == (True, None)
    assert worker.waiting() == 3
    gate.release.set()
    assert worker.flush(10)
    assert gate.seen == ["p0", "p2", "done", "p3"]
    assert not worker.busy()


def test_close_without_drain_drops_what_waits_and_refuses_more() -> None:
    gate = _Gate()
    worker: LatestOnlyWorker[str] = LatestOnlyWorker(gate, "t", drain_on_close=False)
    worker.offer_latest("a")
    assert gate.started.wait(5)
    worker.offer_latest("b")
    idle, dropped = worker.close(0.2)
    assert (idle, dropped) == (False, ["b"])
    assert worker.offer_latest("c") == (False, None)
    assert not worker.put("d")
    gate.release.set()
    assert worker.join(10)
    assert gate.seen == ["a"]


def test_close_with_drain_still_handles_the_queue_after_the_timeout() -> None:
    gate = _Gate()
    worker: LatestOnlyWorker[str] = LatestOnlyWorker(gate, "t", drain_on_close=True)
    worker.put("first")
    assert gate.started.wait(5)
    worker.put("second")
    idle, dropped = worker.close(0.1)
    assert (idle, dropped) == (False, [])
    gate.release.set()
    assert worker.join(10)
    assert gate.seen == ["first", "second"]


def test_a_failing_item_is_reported_and_the_thread_goes_on() -> None:
    errors: list[BaseException] = []
    seen: list[int] = []

    def handle(item: int) -> None:
        if item == 1:
            raise RuntimeError("boom")
        seen.append(item)

    worker: LatestOnlyWorker[int] = LatestOnlyWorker(
        handle, "t", drain_on_close=True, on_error=errors.append
    )
    worker.put(1)
    worker.put(2)
    assert worker.flush(10)
    assert seen == [2]
    assert [str(e) for e in errors] == ["boom"]
    assert worker.close(1) == (True, [])
    assert worker.join(5)
