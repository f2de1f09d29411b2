"""The real RabbitMQ broker for tests: channels, queue depth, a consumer on a thread.

The broker is the one on this machine (``RABBITMQ_HOST`` or 127.0.0.1:5672, guest/guest);
``.ci/run`` starts it. Every test uses its own queue names and deletes them at the end.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pika
import pika.exceptions
import pytest

from lightning_lora.worker.broker import BrokerSettings
from lightning_lora.worker.consumer import Consumer

JOB = {"style_id": 7, "image_urls": ["s3://bkt/k.png"], "webhook_url": "http://backend:8000"}

HOST = os.environ.get("RABBITMQ_HOST", "127.0.0.1")


@contextmanager
def channel() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.ConnectionParameters(HOST))
    try:
        yield connection.channel()
    finally:
        connection.close()


def depth(queue: str) -> int:
    """Ready messages in a queue (passive declare)."""
    with channel() as ch:
        return ch.queue_declare(queue, passive=True).method.message_count


def get(queue: str) -> tuple[pika.spec.BasicProperties, bytes] | None:
    """Fetch (and ack) one message, or None if the queue has none ready."""
    with channel() as ch:
        method, properties, body = ch.basic_get(queue, auto_ack=True)
        return None if method is None else (properties, body)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def require_service(available: bool, reason: str) -> None:
    """Skip the test when a service it needs is missing, naming it; fail instead under CI.

    ``CI=true`` (as ``.ci/run`` is called) must never go green by skipping.
    """
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_broker() -> str:
    """The shared RabbitMQ broker's host, after checking that it answers."""
    try:
        pika.BlockingConnection(pika.ConnectionParameters(HOST, connection_attempts=1)).close()
        reason = ""
    except pika.exceptions.AMQPError as exc:
        reason = (
            f"RabbitMQ is not reachable at {HOST}:5672 ({type(exc).__name__}); start it with "
            "`rabbitmq-server -detached` (.ci/run does)"
        )
    require_service(not reason, reason)
    return HOST


@pytest.fixture
def broker_settings(shared_broker: str) -> Iterator[BrokerSettings]:
    """Settings with a unique queue; both queues are deleted afterwards."""
    name = f"test_lora_{uuid.uuid4().hex[:10]}"
    result = BrokerSettings(
        host=HOST,
        queue=name,
        connection_name=f"{name}-worker",
        heartbeat=10,
        reconnect_initial_delay=0.2,
        reconnect_max_delay=1.0,
    )
    try:
        yield result
    finally:
        with channel() as ch:
            ch.queue_delete(result.queue)
            ch.queue_delete(result.dlq)
            ch.queue_delete(result.cancels)


@contextmanager
def running(consumer: Consumer) -> Iterator[threading.Thread]:
    """Run the consumer on a background thread; always stop it."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=target, name="consumer", daemon=True)
    thread.start()
    try:
        assert consumer.consuming.wait(10), "consumer did not start"
        yield thread
    finally:
        consumer.request_stop()
        thread.join(15)
    assert not thread.is_alive(), "consumer did not stop"
    assert not errors, errors
