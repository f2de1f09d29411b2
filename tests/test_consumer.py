"""Tests for lightning_lora.worker.consumer against the real broker (RABBITMQ_HOST or 127.0.0.1).

Every test uses its own queue (and DLQ) names and deletes them at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import pika.exceptions
import pytest

from lightning_lora.worker.consumer import (
    BrokerSettings,
    Consumer,
    Delivery,
    Outcome,
    TopologyError,
    declare_topology,
    publish_job,
)

HOST = os.environ.get("RABBITMQ_HOST", "127.0.0.1")
JOB = {"style_id": 7, "image_urls": ["s3://b/k.png"], "webhook_url": "http://backend:8000"}


def _broker_available() -> bool:
    try:
        pika.BlockingConnection(pika.ConnectionParameters(HOST, connection_attempts=1)).close()
    except pika.exceptions.AMQPError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _broker_available(), reason=f"no RabbitMQ at {HOST}")


# --------------------------------------------------------------------------- helpers


@contextmanager
def _channel() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.ConnectionParameters(HOST))
    try:
        yield connection.channel()
    finally:
        connection.close()


def _depth(queue: str) -> int:
    """Ready messages in a queue (passive declare)."""
    with _channel() as channel:
        return channel.queue_declare(queue, passive=True).method.message_count


def _get(queue: str) -> tuple[pika.spec.BasicProperties, bytes] | None:
    """Fetch (and ack) one message, or None if the queue has none ready."""
    with _channel() as channel:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        return None if method is None else (properties, body)


def _wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture
def settings() -> Iterator[BrokerSettings]:
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
        with _channel() as channel:
            channel.queue_delete(result.queue)
            channel.queue_delete(result.dlq)


@contextmanager
def _running(consumer: Consumer) -> Iterator[threading.Thread]:
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


# --------------------------------------------------------------------------- tests


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
    with _running(consumer):
        publish_job(settings, JOB)
        assert done.wait(20)
        assert _wait_for(lambda: _depth(settings.queue) == 0, 5)
        time.sleep(1)  # a lost connection would show up as a redelivery here
        assert consumer.connections_made == 1
    assert len(calls) == 1
    assert calls[0].delivery_count == 0
    assert _depth(settings.queue) == 0
    assert _get(settings.queue) is None  # a second consumer gets nothing


def test_reject_dead_letters(settings: BrokerSettings) -> None:
    consumer = Consumer(settings, lambda delivery: Outcome.REJECT, poll_interval=0.2)
    with _running(consumer):
        publish_job(settings, b'{"broken": true}')
        assert _wait_for(lambda: _depth(settings.dlq) == 1, 10)
    assert _depth(settings.queue) == 0
    fetched = _get(settings.dlq)
    assert fetched is not None and fetched[1] == b'{"broken": true}'


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
    with _running(consumer):
        publish_job(settings, JOB)
        assert _wait_for(lambda: _depth(settings.dlq) == 1, 15)
        time.sleep(0.3)
    assert seen == [0, 1, 2]
    assert poisoned == [settings.delivery_limit]
    assert _depth(settings.queue) == 0


def test_graceful_stop_requeues_an_unfinished_job(settings: BrokerSettings) -> None:
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
        assert _depth(settings.queue) == 1
    finally:
        consumer.request_stop()
        release.set()
        thread.join(10)
    fetched = _get(settings.queue)
    assert fetched is not None and json.loads(fetched[1]) == JOB
    assert fetched[0].headers["x-delivery-count"] == 1


def test_publish_with_confirms_then_consume(settings: BrokerSettings) -> None:
    received: list[Delivery] = []
    consumer = Consumer(settings, lambda d: received.append(d) or Outcome.ACK, poll_interval=0.2)
    with _running(consumer):
        message_id = publish_job(settings, JOB, headers={"origin": "test"})
        assert _wait_for(lambda: bool(received), 10)
    (delivery,) = received
    assert json.loads(delivery.body) == JOB
    assert delivery.message_id == message_id
    assert delivery.properties.delivery_mode == 2
    assert delivery.properties.content_type == "application/json"
    assert delivery.headers["origin"] == "test"
    assert delivery.delivery_count == 0 and not delivery.redelivered
    assert delivery.published_at is not None
    assert abs(delivery.published_at.timestamp() - time.time()) < 60
    assert _depth(settings.queue) == 0


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
    with _running(consumer):
        pid = _connection_pid(settings.connection_name)
        assert pid, "worker connection not found"
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "test: forced close"],
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert _wait_for(lambda: consumer.connections_made >= 2 and consumer.consuming.is_set(), 15)
        publish_job(settings, JOB)
        assert _wait_for(lambda: bool(received), 10)
    assert json.loads(received[0].body) == JOB
    assert _depth(settings.queue) == 0


def test_topology_mismatch_is_reported(settings: BrokerSettings) -> None:
    with _channel() as channel:
        channel.queue_declare(settings.queue, durable=True)  # a classic queue without arguments
    consumer = Consumer(settings, lambda d: Outcome.ACK)
    with pytest.raises(TopologyError, match=settings.queue):
        consumer.run()
    with _channel() as channel, pytest.raises(TopologyError, match="x-dead-letter"):
        declare_topology(channel, settings)


def test_settings_from_env_hide_the_password() -> None:
    env = {
        "RABBITMQ_URL": "amqp://alice:s3cr3t@mq.example:5673/prod",
        "RABBITMQ_DELIVERY_LIMIT": "5",
    }
    settings = BrokerSettings.from_env(env)
    assert (settings.host, settings.port, settings.user, settings.vhost) == (
        "mq.example",
        5673,
        "alice",
        "prod",
    )
    assert settings.delivery_limit == 5 and settings.dlq == "model_training.dlq"
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in settings.describe()
    plain = BrokerSettings.from_env({"RABBITMQ_HOST": "rabbit", "RABBITMQ_PASSWORD": "pw"})
    assert plain.host == "rabbit" and plain.password == "pw" and "pw" not in repr(plain)
    with pytest.raises(ValueError, match="RABBITMQ_PORT"):
        BrokerSettings.from_env({"RABBITMQ_PORT": "abc"})


def test_enqueue_cli_validates_then_publishes(
    settings: BrokerSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_lora.worker.enqueue import main

    monkey_env = {"RABBITMQ_HOST": HOST, "RABBITMQ_QUEUE": settings.queue}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in monkey_env.items():
            mp.setenv(key, value)
        bad = main(["--style-id", "7", "--image-url", "file:///etc/passwd", "--webhook-url", "x"])
        assert bad == 2
        assert "image_urls.0" in capsys.readouterr().err
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(JOB))
        assert main(["--file", str(job_file), "--num-epochs", "3", "--style-token", "a b"]) == 0
    message_id = capsys.readouterr().out.strip()
    fetched = _get(settings.queue)
    assert fetched is not None
    properties, body = fetched
    assert properties.message_id == message_id
    assert json.loads(body) == {**JOB, "num_epochs": 3, "style_token": "a b"}
