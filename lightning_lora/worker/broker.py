"""How the worker reaches RabbitMQ: settings, the queues it declares, publishing.

Topology. By default the work queue is declared exactly as the platform backend's own code does,
``channel.queue_declare(queue="model_training", durable=True)``: a classic durable queue with no
arguments. Whoever declares it first, the backend or a worker, the other's declaration matches,
so neither ever fails with ``PRECONDITION_FAILED``. Dead-lettering therefore happens in the
worker, not in the broker: a message the worker gives up on is published to the dead-letter
queue (``<queue>.dlq``, also plain and durable) under publisher confirms, with headers saying
why (``x-lightning-lora-reason``, ``x-lightning-lora-error-code``, ``x-original-queue``), and
only then acked (:func:`dead_letter`). Classic queues carry no delivery count, so the worker
counts a job's attempts in its S3 lease (:mod:`lightning_lora.worker.ledger`).

``RABBITMQ_QUEUE_TYPE=quorum`` opts into a quorum queue with a broker-side dead-letter exchange
and ``x-delivery-limit`` (:func:`queue_arguments`); every declarer, the backend included, must
then declare it with those arguments.

The backend's cancels arrive on a third plain durable queue (``<queue>.cancel``,
:func:`publish_cancel`); see :mod:`lightning_lora.worker.cancels`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import BasicProperties

from lightning_lora.worker.settings import BrokerSettings

logger = logging.getLogger(__name__)

_TOPOLOGY_REPLY_CODES = (405, 406)  # RESOURCE_LOCKED, PRECONDITION_FAILED


class TopologyError(RuntimeError):
    """A queue exists on the broker with arguments that differ from the ones we declare."""


class PublishError(RuntimeError):
    """The broker did not confirm a published message (nack) or could not route it."""


# --------------------------------------------------------------------------- topology


def queue_arguments(settings: BrokerSettings) -> dict[str, Any]:
    """Arguments of the work queue (none for ``classic``, as the backend declares it).

    For ``quorum``: a durable quorum queue dead-lettering into the DLQ after ``delivery_limit``.

    Args:
        settings: Broker settings.

    Returns:
        The ``queue.declare`` arguments.
    """
    if settings.queue_type == "classic":
        return {}
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dlq,
        "x-delivery-limit": settings.delivery_limit,
    }


def declare_topology(channel: BlockingChannel, settings: BrokerSettings) -> None:
    """Declare the dead-letter, cancel and work queues (idempotent).

    The classic work queue is declared with no arguments, exactly like the backend's
    ``queue_declare(queue=..., durable=True)``, so both orders of declaration work.

    Args:
        channel: An open channel. It is closed by the broker if a declaration fails.
        settings: Broker settings.

    Raises:
        TopologyError: If a queue already exists with other arguments or type
            (``PRECONDITION_FAILED``); the message names the queue and the broker's reason.
    """
    _declare(channel, settings.dlq, arguments={})
    _declare(channel, settings.cancels, arguments={})
    _declare(channel, settings.queue, arguments=queue_arguments(settings))


def _declare(channel: BlockingChannel, name: str, arguments: dict[str, Any]) -> None:
    try:
        if arguments:
            channel.queue_declare(queue=name, durable=True, arguments=arguments)
        else:  # exactly the backend's declaration
            channel.queue_declare(queue=name, durable=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code in _TOPOLOGY_REPLY_CODES:
            raise TopologyError(
                f"queue {name!r} already exists with different settings than "
                f"{arguments or 'a plain durable queue'}: {exc.reply_text}. Delete the queue or "
                f"align the worker's settings (RABBITMQ_QUEUE_TYPE, RABBITMQ_DELIVERY_LIMIT)."
            ) from exc
        raise


# --------------------------------------------------------------------------- publishing


def publish_job(
    settings: BrokerSettings,
    body: Mapping[str, Any] | bytes,
    *,
    message_id: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Publish a job persistently, with publisher confirms, after declaring the topology.

    Args:
        settings: Broker settings (queue and connection).
        body: The job as a JSON-serialisable mapping, or raw bytes.
        message_id: The message id; a random UUID hex by default.
        headers: Optional message headers.

    Returns:
        The message id.

    Raises:
        PublishError: If the broker nacks the message or cannot route it.
        TopologyError: If the queues exist with incompatible arguments.
        pika.exceptions.AMQPError: If the broker cannot be reached.
    """
    return _publish(settings, settings.queue, body, message_id=message_id, headers=headers)


def publish_cancel(settings: BrokerSettings, style_id: int) -> str:
    """Cancel a style's job: ``{"style_id": N}`` to the cancel queue, as the backend sends it.

    Args:
        settings: Broker settings (the cancel queue and connection).
        style_id: The style whose queued or running job stops.

    Returns:
        The message id.

    Raises:
        PublishError: If the broker nacks the message or cannot route it.
        pika.exceptions.AMQPError: If the broker cannot be reached.
    """
    return _publish(settings, settings.cancels, {"style_id": style_id})


def _publish(
    settings: BrokerSettings,
    queue: str,
    body: Mapping[str, Any] | bytes,
    *,
    message_id: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    payload = body if isinstance(body, bytes) else json.dumps(dict(body)).encode("utf-8")
    message_id = message_id or uuid.uuid4().hex
    properties = BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent.value,
        timestamp=int(time.time()),
        message_id=message_id,
        app_id="lightning_lora",
        headers=dict(headers) if headers else None,
    )
    with confirmed_channel(settings, "publisher") as channel:
        try:
            channel.basic_publish("", queue, payload, properties, mandatory=True)
        except pika.exceptions.UnroutableError as exc:
            raise PublishError(f"message {message_id} could not be routed to {queue!r}") from exc
        except pika.exceptions.NackError as exc:
            raise PublishError(f"the broker refused message {message_id} (nack)") from exc
    logger.info("published message %s to %r", message_id, queue)
    return message_id


def dead_letter(
    channel: BlockingChannel,
    settings: BrokerSettings,
    body: bytes,
    properties: BasicProperties | None,
    reason: str,
    error_code: str | None = None,
) -> None:
    """Publish a message to the dead-letter queue, persistently, and wait for the confirm.

    The original properties are kept (``message_id``, ``content_type``...); the headers gain
    ``x-lightning-lora-reason``, ``x-lightning-lora-error-code`` and ``x-original-queue``.

    Args:
        channel: A channel in confirm mode (``channel.confirm_delivery()``).
        settings: Broker settings (the DLQ's name).
        body: The message body.
        properties: The message's properties, if any.
        reason: Why it is dead-lettered (one line, for operators).
        error_code: The failure code reported to the backend, if any.

    Raises:
        PublishError: The broker refused or could not route it.
        pika.exceptions.AMQPError: The channel or connection failed.
    """
    original = properties or BasicProperties()
    headers = dict(original.headers or {})
    headers["x-lightning-lora-reason"] = reason[:1000]
    headers["x-original-queue"] = settings.queue
    if error_code:
        headers["x-lightning-lora-error-code"] = error_code
    dead = BasicProperties(
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        delivery_mode=pika.DeliveryMode.Persistent.value,
        message_id=original.message_id,
        timestamp=original.timestamp,
        app_id=original.app_id,
        headers=headers,
    )
    try:
        channel.basic_publish("", settings.dlq, body, dead, mandatory=True)
    except pika.exceptions.UnroutableError as exc:
        raise PublishError(f"dead-letter queue {settings.dlq!r} is missing") from exc
    except pika.exceptions.NackError as exc:
        raise PublishError("the broker refused the dead-lettered message (nack)") from exc


def publish_dead_letter(
    settings: BrokerSettings, body: bytes, headers: Mapping[str, Any], reason: str
) -> None:
    """Dead-letter a body from outside a consumer (the outbox), on a short-lived connection."""
    with confirmed_channel(settings, "outbox") as channel:
        dead_letter(channel, settings, body, BasicProperties(headers=dict(headers)), reason)


@contextlib.contextmanager
def confirmed_channel(settings: BrokerSettings, role: str) -> Iterator[BlockingChannel]:
    """A channel in confirm mode on a short-lived connection, after declaring the topology.

    Args:
        settings: Broker settings.
        role: Appended to the connection name the broker shows (``publisher``, ``outbox``).
    """
    name = f"{settings.connection_name}-{role}"
    connection = BlockingConnection(settings.connection_parameters(connection_name=name))
    try:
        channel = connection.channel()
        declare_topology(channel, settings)
        channel.confirm_delivery()
        yield channel
    finally:
        if connection.is_open:
            connection.close()
