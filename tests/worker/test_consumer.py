"""Tests for lightning_lora.worker.consumer against the real broker (RABBITMQ_HOST or 127.0.0.1).

Every test uses its own queue (and DLQ) names and deletes them at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import pytest

from lightning_lora.worker.broker import BrokerSettings, publish_job
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.deliveries import Delivery, Outcome, Settlement
from tests.support.broker import JOB, depth, get, running, wait_for


def test_heartbeats_survive_a_long_handler(settings: BrokerSettings) -> None:
    settings = settings.replace(heartbeat=2)
    calls: list[Delivery] = []
    done = threading.Event()

    def handler(delivery: Delivery) -> Outcome:
        calls.append(delivery)
        time.sleep(12)  # six heartbeat intervals with the worker thread busy
        done.set()
        return Outcome.ACK

    consumer = Consumer(settings, handler, poll_interval=0.2)
    with running(consumer):
        publish_job(settings, JOB)
        assert done.wait(20)
        assert wait_for(lambda: depth(settings.queue) == 0, 5)
        time.sleep(1)  # a lost connection would show up as a redelivery here
        assert consumer.connections_made == 1
    assert len(calls) == 1
    assert calls[0].delivery_count == 0
    assert depth(settings.queue) == 0
    assert get(settings.queue) is None  # a second consumer gets nothing


def test_reject_dead_letters(settings: BrokerSettings) -> None:
    handler = lambda delivery: Settlement(Outcome.REJECT, "field 'x' is bad", "INVALID_MESSAGE")  # noqa: E731
    consumer = Consumer(settings, handler, poll_interval=0.2)
    with running(consumer):
        publish_job(settings, b'{"broken": true}', message_id="m-1")
        assert wait_for(lambda: depth(settings.dlq) == 1, 10)
    assert depth(settings.queue) == 0
    fetched = get(settings.dlq)
    assert fetched is not None and fetched[1] == b'{"broken": true}'
    properties = fetched[0]
    # worker-side dead-lettering keeps the message and says why
    assert properties.message_id == "m-1" and properties.delivery_mode == 2
    assert properties.headers["x-lightning-lora-reason"] == "field 'x' is bad"
    assert properties.headers["x-lightning-lora-error-code"] == "INVALID_MESSAGE"
    assert properties.headers["x-original-queue"] == settings.queue


def test_failing_handler_is_retried_then_poisoned(settings: BrokerSettings) -> None:
    seen: list[int] = []
    poisoned: list[int] = []

    def handler(delivery: Delivery) -> Outcome:
        seen.append(delivery.delivery_count)
        raise RuntimeError("boom")

    consumer = Consumer(
        settings,
        handler,
        on_poison=lambda delivery: poisoned.append(delivery.delivery_count),
        poll_interval=0.2,
    )
    with running(consumer):
        publish_job(settings, JOB)
        assert wait_for(lambda: depth(settings.dlq) == 1, 15)
        time.sleep(0.3)
    assert seen == [0, 1, 2]
    assert poisoned == [settings.delivery_limit]
    assert depth(settings.queue) == 0


def test_graceful_stop_requeues_an_unfinished_job(settings: BrokerSettings) -> None:
    settings = settings.replace(queue_type="quorum")  # for x-delivery-count below
    started = threading.Event()
    release = threading.Event()
    saw_stop: list[bool] = []

    def handler(delivery: Delivery) -> Outcome:
        started.set()
        saw_stop.append(delivery.stop_requested.wait(10))
        release.wait(30)  # ignores the stop request: "training" cannot checkpoint in time
        return Outcome.ACK

    consumer = Consumer(settings, handler, grace_period=1.0, poll_interval=0.2)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        assert consumer.consuming.wait(10)
        publish_job(settings, JOB)
        assert started.wait(10)
        stop_at = time.monotonic()
        consumer.request_stop()
        thread.join(10)
        assert not thread.is_alive(), "run() did not return"
        assert time.monotonic() - stop_at < 5
        assert saw_stop == [True]
        assert depth(settings.queue) == 1
    finally:
        consumer.request_stop()
        release.set()
        thread.join(10)
    fetched = get(settings.queue)
    assert fetched is not None and json.loads(fetched[1]) == JOB
    assert fetched[0].headers["x-delivery-count"] == 1


def test_publish_with_confirms_then_consume(settings: BrokerSettings) -> None:
    received: list[Delivery] = []
    consumer = Consumer(settings, lambda d: received.append(d) or Outcome.ACK, poll_interval=0.2)
    with running(consumer):
        message_id = publish_job(settings, JOB, headers={"origin": "test"})
        assert wait_for(lambda: bool(received), 10)
    (delivery,) = received
    assert json.loads(delivery.body) == JOB
    assert delivery.message_id == message_id
    assert delivery.properties.delivery_mode == 2
    assert delivery.properties.content_type == "application/json"
    assert delivery.headers["origin"] == "test"
    assert delivery.delivery_count == 0 and not delivery.redelivered
    assert delivery.published_at is not None
    assert abs(delivery.published_at.timestamp() - time.time()) < 60
    assert depth(settings.queue) == 0


def _connection_pid(connection_name: str) -> str | None:
    listing = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for line in listing.splitlines():
        if f'{{"connection_name","{connection_name}"}}' in line:
            return line.split("\t", 1)[0].strip()
    return None


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl not available")
def test_reconnects_after_the_broker_closes_the_connection(settings: BrokerSettings) -> None:
    received: list[Delivery] = []
    consumer = Consumer(settings, lambda d: received.append(d) or Outcome.ACK, poll_interval=0.2)
    with running(consumer):
        pid = _connection_pid(settings.connection_name)
        assert pid, "worker connection not found"
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "test: forced close"],
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert wait_for(lambda: consumer.connections_made >= 2 and consumer.consuming.is_set(), 15)
        publish_job(settings, JOB)
        assert wait_for(lambda: bool(received), 10)
    assert json.loads(received[0].body) == JOB
    assert depth(settings.queue) == 0
