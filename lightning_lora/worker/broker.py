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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import BasicProperties
from pydantic import SecretStr

logger = logging.getLogger(__name__)

DEFAULT_QUEUE = "model_training"
_TOPOLOGY_REPLY_CODES = (405, 406)  # RESOURCE_LOCKED, PRECONDITION_FAILED


class TopologyError(RuntimeError):
    """A queue exists on the broker with arguments that differ from the ones we declare."""


class PublishError(RuntimeError):
    """The broker did not confirm a published message (nack) or could not route it."""


# --------------------------------------------------------------------------- settings


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach RabbitMQ and which queues to use.

    Read them from the environment with :meth:`from_env`. The password (and the URL, which may
    contain it) never appears in ``repr`` or in logs; use :meth:`describe` for a safe summary.

    Note:
        There is no consumer-timeout setting: RabbitMQ 3.10 ignores the per-queue
        ``x-consumer-timeout`` argument; configure the broker-wide ``consumer_timeout`` instead
        (see the module docstring).

    Attributes:
        host: Broker host (``RABBITMQ_HOST``, default ``localhost``).
        port: Broker port (``RABBITMQ_PORT``, default 5672).
        user: User name (``RABBITMQ_USER``, default ``guest``).
        password: Password (``RABBITMQ_PASSWORD``, default ``guest``); never logged.
        vhost: Virtual host (``RABBITMQ_VHOST``, default ``/``).
        url: Full ``amqp://`` / ``amqps://`` URL (``RABBITMQ_URL``); when set it wins over the
            discrete fields for connecting (TLS options included). Never logged.
        heartbeat: Heartbeat interval in seconds (``RABBITMQ_HEARTBEAT``, default 60).
        queue: Work queue (``RABBITMQ_QUEUE``, default ``model_training``).
        dead_letter_queue: Dead-letter queue (``RABBITMQ_DLQ``, default ``<queue>.dlq``).
        delivery_limit: Attempts after which a job is poison (``RABBITMQ_DELIVERY_LIMIT``,
            default 3): counted in the job's S3 lease (crashes), or the quorum queue's
            ``x-delivery-count``; also the quorum queue's ``x-delivery-limit``.
        queue_type: ``classic`` (default: declared exactly as the backend does) or ``quorum``
            (``RABBITMQ_QUEUE_TYPE``).
        connection_name: ``connection_name`` client property shown by the broker
            (``RABBITMQ_CONNECTION_NAME``, default ``lightning_lora-worker``).
        blocked_connection_timeout: Seconds a connection blocked by a broker alarm may wait.
        reconnect_initial_delay: First reconnect delay in seconds (before jitter).
        reconnect_max_delay: Upper bound of the reconnect delay in seconds.
    """

    host: str = "localhost"
    port: int = 5672
    user: str = "guest"
    password: SecretStr = field(default=SecretStr("guest"), repr=False)
    vhost: str = "/"
    url: str | None = field(default=None, repr=False)
    heartbeat: int = 60
    queue: str = DEFAULT_QUEUE
    dead_letter_queue: str | None = None
    delivery_limit: int = 3
    queue_type: str = "classic"
    connection_name: str = "lightning_lora-worker"
    blocked_connection_timeout: float = 300.0
    reconnect_initial_delay: float = 1.0
    reconnect_max_delay: float = 30.0

    def __post_init__(self) -> None:
        """Validate the values.

        Raises:
            ValueError: If a value is out of range.
        """
        if isinstance(self.password, str):  # a plain string given: keep it as a secret
            object.__setattr__(self, "password", SecretStr(self.password))
        if not self.queue or len(self.queue.encode()) > 255:
            raise ValueError("queue name must be 1..255 bytes")
        if self.delivery_limit < 1:
            raise ValueError("RABBITMQ_DELIVERY_LIMIT must be at least 1")
        if self.queue_type not in ("classic", "quorum"):
            raise ValueError(
                f"RABBITMQ_QUEUE_TYPE must be 'classic' or 'quorum', got {self.queue_type!r}"
            )
        if self.heartbeat < 0:
            raise ValueError("heartbeat must be >= 0")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.reconnect_initial_delay <= 0 or self.reconnect_max_delay <= 0:
            raise ValueError("reconnect delays must be > 0")

    @property
    def dlq(self) -> str:
        """The dead-letter queue name (``<queue>.dlq`` unless set)."""
        return self.dead_letter_queue or f"{self.queue}.dlq"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> BrokerSettings:
        """Build settings from environment variables.

        Args:
            env: Variables to read; defaults to ``os.environ``.
            **overrides: Field values that win over the environment.

        Returns:
            The settings.

        Raises:
            ValueError: If a numeric variable is not an integer or a value is out of range.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "host": env.get("RABBITMQ_HOST") or "localhost",
            "port": _env_int(env, "RABBITMQ_PORT", 5672),
            "user": env.get("RABBITMQ_USER") or "guest",
            "password": env.get("RABBITMQ_PASSWORD") or "guest",
            "vhost": env.get("RABBITMQ_VHOST") or "/",
            "heartbeat": _env_int(env, "RABBITMQ_HEARTBEAT", 60),
            "queue": env.get("RABBITMQ_QUEUE") or DEFAULT_QUEUE,
            "dead_letter_queue": env.get("RABBITMQ_DLQ") or None,
            "delivery_limit": _env_int(env, "RABBITMQ_DELIVERY_LIMIT", 3),
            "queue_type": (env.get("RABBITMQ_QUEUE_TYPE") or "classic").strip().lower(),
            "connection_name": env.get("RABBITMQ_CONNECTION_NAME") or "lightning_lora-worker",
        }
        url = env.get("RABBITMQ_URL")
        if url:
            values.update(_fields_from_url(url))
            values["url"] = url
            if env.get("RABBITMQ_HEARTBEAT"):
                values["heartbeat"] = _env_int(env, "RABBITMQ_HEARTBEAT", 60)
        values.update(overrides)
        if isinstance(values.get("password"), str):
            values["password"] = SecretStr(values["password"])
        return cls(**values)

    def replace(self, **changes: Any) -> BrokerSettings:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def connection_parameters(
        self, connection_name: str | None = None
    ) -> pika.ConnectionParameters:
        """Build pika connection parameters.

        Args:
            connection_name: ``connection_name`` client property; defaults to
                :attr:`connection_name`.

        Returns:
            Parameters with our heartbeat, timeouts and client properties.
        """
        name = connection_name or self.connection_name
        params: pika.ConnectionParameters
        if self.url:
            params = pika.URLParameters(self.url)
        else:
            params = pika.ConnectionParameters(
                host=self.host,
                port=self.port,
                virtual_host=self.vhost,
                credentials=pika.PlainCredentials(self.user, self.password.get_secret_value()),
            )
        params.heartbeat = self.heartbeat
        params.blocked_connection_timeout = self.blocked_connection_timeout
        params.connection_attempts = 1
        params.client_properties = {"connection_name": name, "product": "lightning_lora"}
        return params

    def describe(self) -> str:
        """A log-safe description of the broker endpoint (no password)."""
        scheme = "amqps" if (self.url or "").startswith("amqps://") else "amqp"
        vhost = quote(self.vhost, safe="")
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{vhost} queue={self.queue!r}"


def _fields_from_url(url: str) -> dict[str, Any]:
    """Host, port, user, password, vhost and heartbeat of an AMQP URL (via pika)."""
    try:
        params = pika.URLParameters(url)
    except Exception as exc:  # pika raises several types for bad URLs
        raise ValueError(f"RABBITMQ_URL is not a valid AMQP URL ({type(exc).__name__})") from None
    fields: dict[str, Any] = {
        "host": params.host,
        "port": params.port,
        "vhost": params.virtual_host,
    }
    credentials = params.credentials
    if isinstance(credentials, pika.PlainCredentials):
        fields["user"] = credentials.username
        fields["password"] = credentials.password
    if isinstance(params.heartbeat, int):
        fields["heartbeat"] = params.heartbeat
    return fields


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
    """Declare the dead-letter queue and the work queue (idempotent).

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
            channel.basic_publish("", settings.queue, payload, properties, mandatory=True)
        except pika.exceptions.UnroutableError as exc:
            raise PublishError(
                f"message {message_id} could not be routed to {settings.queue!r}"
            ) from exc
        except pika.exceptions.NackError as exc:
            raise PublishError(f"the broker refused message {message_id} (nack)") from exc
    logger.info("published message %s to %r", message_id, settings.queue)
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
