"""A thin, robust RabbitMQ consumer (pika) that knows nothing about training.

Design (after pika's ``examples/basic_consumer_threaded.py``):

* One ``BlockingConnection`` owned by the thread that calls :meth:`Consumer.run` (the
  *connection thread*). It loops on ``connection.process_data_events`` so heartbeats keep being
  answered while a job runs.
* ``prefetch_count=1`` and manual acks: one job at a time. Each delivery is handled on a worker
  thread; its :class:`Outcome` goes back to the connection thread through
  ``connection.add_callback_threadsafe``, which acks (``ACK``), dead-letters (``REJECT``:
  ``basic_reject(requeue=False)``) or requeues (``REQUEUE``: ``basic_nack(requeue=True)``).
* Poison messages: a delivery whose ``x-delivery-count`` is ``>= delivery_limit`` is not handed
  to the handler; the optional ``on_poison`` hook runs (e.g. to send a failure webhook) and the
  message is rejected into the dead-letter queue. The quorum queue's ``x-delivery-limit`` (same
  value) is the broker-side backstop: RabbitMQ 3.10 still delivers a message whose count equals
  the limit and dead-letters it on the following return, so the hook always gets its chance.
* Connection loss (``AMQPConnectionError``, ``StreamLostError``, ``ConnectionClosedByBroker``,
  a channel closed by the broker, a consumer cancelled by the broker ...) is followed by a
  reconnect with bounded, jittered exponential backoff. A job that is running when the
  connection dies keeps running; its outcome cannot be acknowledged any more, so the broker
  redelivers the message once the worker reconnects (after the job ended, so that two runs of
  the same job never overlap). **Handlers must therefore be idempotent.**
* Graceful stop: :meth:`Consumer.request_stop` (also SIGTERM/SIGINT when :meth:`Consumer.run`
  runs on the main thread) cancels the consumer, waits up to ``grace_period`` for the running
  job, requeues its message if it did not finish, closes the connection and returns. Handlers
  should poll :attr:`Delivery.stop_requested` (or :attr:`Consumer.stop_requested`) and
  checkpoint.

Delivery counts: on RabbitMQ 3.10 every return of a message to a quorum queue (nack/reject with
requeue, a consumer that disconnects with the message unacked, *including* a requeue on
graceful stop) increments ``x-delivery-count``.

Consumer timeout on RabbitMQ 3.10 (for the README): the per-queue ``x-consumer-timeout``
argument is accepted by 3.10.8 at declaration but **ignored**: a 3 s value did not close a
channel that held an unacknowledged delivery for 100 s, on classic and on quorum queues
(per-queue consumer timeouts arrived in RabbitMQ 3.12). So this module does not set it. On
3.10 the only timeout is the broker-wide ``consumer_timeout`` in ``rabbitmq.conf`` (default
1800000 ms = 30 min), which a long training exceeds: the broker then closes the channel with
``PRECONDITION_FAILED``, the job's outcome is lost and the message is redelivered. Raise it on
the broker to more than the longest training, e.g. ``consumer_timeout = 86400000`` in
``rabbitmq.conf`` (or at runtime:
``rabbitmqctl eval 'application:set_env(rabbit, consumer_timeout, 86400000).'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

logger = logging.getLogger(__name__)

DEFAULT_QUEUE = "model_training"
RECOVERABLE_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    OSError,
)
"""Errors after which :meth:`Consumer.run` reconnects instead of giving up."""
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
        delivery_limit: Deliveries after which a message is poison (``RABBITMQ_DELIVERY_LIMIT``,
            default 3); also the quorum queue's ``x-delivery-limit``.
        connection_name: ``connection_name`` client property shown by the broker
            (``RABBITMQ_CONNECTION_NAME``, default ``lightning_lora-worker``).
        blocked_connection_timeout: Seconds a connection blocked by a broker alarm may wait.
        reconnect_initial_delay: First reconnect delay in seconds (before jitter).
        reconnect_max_delay: Upper bound of the reconnect delay in seconds.
    """

    host: str = "localhost"
    port: int = 5672
    user: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"
    url: str | None = field(default=None, repr=False)
    heartbeat: int = 60
    queue: str = DEFAULT_QUEUE
    dead_letter_queue: str | None = None
    delivery_limit: int = 3
    connection_name: str = "lightning_lora-worker"
    blocked_connection_timeout: float = 300.0
    reconnect_initial_delay: float = 1.0
    reconnect_max_delay: float = 30.0

    def __post_init__(self) -> None:
        """Validate the values.

        Raises:
            ValueError: If a value is out of range.
        """
        if not self.queue or len(self.queue.encode()) > 255:
            raise ValueError("queue name must be 1..255 bytes")
        if self.delivery_limit < 1:
            raise ValueError("delivery_limit must be at least 1")
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
            "connection_name": env.get("RABBITMQ_CONNECTION_NAME") or "lightning_lora-worker",
        }
        url = env.get("RABBITMQ_URL")
        if url:
            values.update(_fields_from_url(url))
            values["url"] = url
            if env.get("RABBITMQ_HEARTBEAT"):
                values["heartbeat"] = _env_int(env, "RABBITMQ_HEARTBEAT", 60)
        values.update(overrides)
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
                credentials=pika.PlainCredentials(self.user, self.password),
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
    """Arguments of the work queue: durable quorum queue dead-lettering into the DLQ.

    Args:
        settings: Broker settings.

    Returns:
        The ``queue.declare`` arguments.
    """
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dlq,
        "x-delivery-limit": settings.delivery_limit,
    }


def declare_topology(channel: BlockingChannel, settings: BrokerSettings) -> None:
    """Declare the dead-letter queue and the work queue (idempotent).

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
        channel.queue_declare(name, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code in _TOPOLOGY_REPLY_CODES:
            raise TopologyError(
                f"queue {name!r} already exists with different settings than "
                f"{arguments or 'a plain durable queue'}: {exc.reply_text}. Delete the queue or "
                f"align the worker's settings (e.g. RABBITMQ_DELIVERY_LIMIT)."
            ) from exc
        raise


# --------------------------------------------------------------------------- deliveries


class Outcome(enum.Enum):
    """What to do with a message once its handler returned."""

    ACK = "ack"
    """Done: remove the message."""
    REJECT = "reject"
    """Never retry: dead-letter the message (``basic_reject(requeue=False)``)."""
    REQUEUE = "requeue"
    """Put the message back for a later delivery (e.g. on shutdown)."""


@dataclass(frozen=True)
class Delivery:
    """One message handed to the handler.

    Attributes:
        body: The raw body.
        properties: The AMQP properties.
        headers: The message headers (empty dict if none).
        delivery_tag: The channel's delivery tag.
        redelivered: The broker's redelivered flag.
        delivery_count: Previous deliveries of this message (quorum ``x-delivery-count``,
            0 on the first delivery).
        published_at: When the message was published (``timestamp`` property), if set.
        stop_requested: Set when the consumer is asked to stop; long handlers should poll it.
    """

    body: bytes = field(repr=False)
    properties: BasicProperties = field(repr=False)
    headers: Mapping[str, Any]
    delivery_tag: int
    redelivered: bool
    delivery_count: int
    published_at: datetime | None
    stop_requested: threading.Event = field(repr=False, compare=False)

    @property
    def message_id(self) -> str | None:
        """The ``message_id`` property, if set."""
        return self.properties.message_id

    @classmethod
    def from_amqp(
        cls,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        stop_requested: threading.Event,
    ) -> Delivery:
        """Build a delivery from what pika passes to a consumer callback."""
        headers = dict(properties.headers or {})
        return cls(
            body=body,
            properties=properties,
            headers=headers,
            delivery_tag=method.delivery_tag,
            redelivered=bool(method.redelivered),
            delivery_count=_delivery_count(headers),
            published_at=_published_at(properties),
            stop_requested=stop_requested,
        )


def _delivery_count(headers: Mapping[str, Any]) -> int:
    count = headers.get("x-delivery-count", 0)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


def _published_at(properties: BasicProperties) -> datetime | None:
    timestamp = properties.timestamp
    if not isinstance(timestamp, int):
        return None
    try:
        return datetime.fromtimestamp(timestamp, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


@dataclass
class _InFlight:
    """A delivery being handled; touched by the connection thread only (``settled``)."""

    channel: BlockingChannel
    delivery: Delivery
    settled: bool = False


Handler = Callable[[Delivery], Outcome]
PoisonHook = Callable[[Delivery], None]


# --------------------------------------------------------------------------- consumer


class Consumer:
    """Consume the work queue, one message at a time, on a worker thread.

    Args:
        settings: Broker settings.
        handler: Called on a worker thread for each delivery; returns an :class:`Outcome`. An
            exception requeues the message while its delivery count is below the limit, else
            dead-letters it. Must be idempotent (see the module docstring).
        on_poison: Called (on the worker thread) for a delivery whose count reached the
            limit, before it is dead-lettered; exceptions are logged and ignored.
        grace_period: Seconds a running job may still take after a stop request before its
            message is requeued and :meth:`run` returns anyway.
        poll_interval: Seconds between checks of the stop flag while serving the connection.

    Attributes:
        consuming: Set while a consumer is registered with the broker (cleared when the
            connection is lost or the consumer stops); handy to wait for readiness.
        connections_made: How many times a connection was (re)established.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        handler: Handler,
        *,
        on_poison: PoisonHook | None = None,
        grace_period: float = 30.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.settings = settings
        self._handler = handler
        self._on_poison = on_poison
        self._grace_period = grace_period
        self._poll_interval = poll_interval
        self._stop = threading.Event()
        self._stop_at: float | None = None
        self.consuming = threading.Event()
        self.connections_made = 0
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self._current: _InFlight | None = None
        self._worker: threading.Thread | None = None
        self._cancelled_by_broker = False

    # ----------------------------------------------------------------- public API

    @property
    def stop_requested(self) -> threading.Event:
        """Event set once a stop was requested (poll it from the handler)."""
        return self._stop

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (thread-safe, idempotent, safe in a signal handler)."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._stop.set()

    def run(self) -> None:
        """Consume until :meth:`request_stop` (or SIGTERM/SIGINT on the main thread).

        Reconnects with backoff after connection loss. Returns normally after a stop.

        Raises:
            TopologyError: If the queues exist with incompatible arguments.
        """
        logger.info("consumer starting (%s)", self.settings.describe())
        with self._signal_handlers():
            try:
                self._run_loop()
            finally:
                self.consuming.clear()
                self._close_connection()
                self._wait_for_worker_until_deadline()
        logger.info("consumer stopped")

    # ----------------------------------------------------------------- connection loop

    def _run_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self._await_orphaned_job()
                if self._stop.is_set():
                    break
                self._connect()
                attempt = 0
                self._serve()
                return
            except TopologyError:
                raise
            except RECOVERABLE_ERRORS as exc:
                self._abandon_connection()
                if self._stop.is_set():
                    break
                delay = self._backoff_delay(attempt)
                attempt += 1
                logger.warning(
                    "broker connection lost or unavailable (%s: %s); reconnecting in %.1fs",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                self._stop.wait(delay)

    def _backoff_delay(self, attempt: int) -> float:
        """Jittered exponential backoff: uniform in [d/2, d], d = min(max, initial * 2**n)."""
        initial = self.settings.reconnect_initial_delay
        ceiling = min(self.settings.reconnect_max_delay, initial * 2 ** min(attempt, 30))
        return random.uniform(ceiling / 2, ceiling)

    def _connect(self) -> None:
        params = self.settings.connection_parameters()
        self._connection = BlockingConnection(params)
        channel = self._connection.channel()
        declare_topology(channel, self.settings)
        channel.basic_qos(prefetch_count=1)
        self._cancelled_by_broker = False
        channel.add_on_cancel_callback(self._on_broker_cancel)
        self._consumer_tag = channel.basic_consume(
            self.settings.queue, self._on_message, auto_ack=False
        )
        self._channel = channel
        self.connections_made += 1
        self.consuming.set()
        logger.info("consuming from %s", self.settings.describe())

    def _serve(self) -> None:
        """Serve the connection until a stop request, then drain; raise on connection loss."""
        assert self._connection is not None and self._channel is not None
        while not self._stop.is_set():
            self._connection.process_data_events(time_limit=self._poll_interval)
            if self._cancelled_by_broker:
                raise pika.exceptions.ConsumerCancelled("consumer cancelled by the broker")
            if not self._channel.is_open:
                raise pika.exceptions.ChannelClosed(0, "channel closed by the broker")
        logger.info("stop requested; no longer taking new messages")
        self._drain()

    def _drain(self) -> None:
        """Cancel the consumer, give the running job its grace period, requeue it if late."""
        assert self._connection is not None and self._channel is not None
        self.consuming.clear()
        if self._channel.is_open and self._consumer_tag is not None:
            self._channel.basic_cancel(self._consumer_tag)
        deadline = self._deadline()
        while self._current is not None and time.monotonic() < deadline:
            remaining = deadline - time.monotonic()
            self._connection.process_data_events(time_limit=max(0.0, min(0.2, remaining)))
        if self._current is not None:
            # One last pass: the worker may have queued its outcome just now.
            self._connection.process_data_events(time_limit=0)
        if self._current is not None:
            logger.warning(
                "job %s did not finish within the %.1fs grace period; requeueing its message",
                self._current.delivery.message_id,
                self._grace_period,
            )
            self._settle(self._current, Outcome.REQUEUE)

    def _deadline(self) -> float:
        return (self._stop_at or time.monotonic()) + self._grace_period

    def _on_broker_cancel(self, _method_frame: Any) -> None:
        logger.warning("the broker cancelled our consumer (queue deleted or moved?)")
        self._cancelled_by_broker = True

    def _abandon_connection(self) -> None:
        """Forget a broken connection; an unsettled job can no longer be acked."""
        self.consuming.clear()
        if self._current is not None:
            logger.warning(
                "connection lost while job %s runs; its outcome cannot be acknowledged and "
                "the broker will redeliver the message",
                self._current.delivery.message_id,
            )
            self._current.settled = True
            self._current = None
        self._close_connection()

    def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._consumer_tag = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception as exc:  # closing a broken connection may fail in many ways
                logger.debug("error while closing the connection: %r", exc)

    def _await_orphaned_job(self) -> None:
        """Before reconnecting, let a job from a lost connection finish (one job at a time)."""
        worker = self._worker
        if worker is None or not worker.is_alive():
            return
        logger.info("waiting for the running job to finish before reconnecting")
        while worker.is_alive() and not self._stop.is_set():
            worker.join(self._poll_interval)

    def _wait_for_worker_until_deadline(self) -> None:
        worker = self._worker
        if worker is None or not worker.is_alive() or not self._stop.is_set():
            return
        worker.join(max(0.0, self._deadline() - time.monotonic()))
        if worker.is_alive():
            logger.warning("returning while the job is still running (grace period exceeded)")

    # ----------------------------------------------------------------- messages

    def _on_message(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        """Connection-thread callback: start a worker thread for the delivery."""
        delivery = Delivery.from_amqp(method, properties, body, self._stop)
        if self._stop.is_set() or self._current is not None:
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        job = _InFlight(channel=channel, delivery=delivery)
        self._current = job
        connection = self._connection
        assert connection is not None
        logger.info(
            "received message %s (delivery count %d)", delivery.message_id, delivery.delivery_count
        )
        self._worker = threading.Thread(
            target=self._work,
            args=(connection, job),
            name=f"job-{delivery.delivery_tag}",
            daemon=True,
        )
        self._worker.start()

    def _work(self, connection: BlockingConnection, job: _InFlight) -> None:
        """Worker thread: run the handler and hand the outcome back to the connection thread."""
        outcome = Outcome.REQUEUE
        try:
            outcome = self._process(job.delivery)
        finally:
            try:
                connection.add_callback_threadsafe(functools.partial(self._settle, job, outcome))
            except Exception as exc:  # the connection is gone: the broker will redeliver
                logger.warning(
                    "could not report outcome %s of message %s (%s); it will be redelivered",
                    outcome.name,
                    job.delivery.message_id,
                    type(exc).__name__,
                )

    def _process(self, delivery: Delivery) -> Outcome:
        limit = self.settings.delivery_limit
        if delivery.delivery_count >= limit:
            logger.error(
                "message %s was delivered %d times (limit %d); dead-lettering it",
                delivery.message_id,
                delivery.delivery_count,
                limit,
            )
            self._call_poison_hook(delivery)
            return Outcome.REJECT
        try:
            outcome = self._handler(delivery)
        except Exception:
            retry = delivery.delivery_count < limit
            logger.exception(
                "handler failed on message %s; %s",
                delivery.message_id,
                "requeueing" if retry else "dead-lettering",
            )
            return Outcome.REQUEUE if retry else Outcome.REJECT
        if not isinstance(outcome, Outcome):
            logger.error("handler returned %r instead of an Outcome; requeueing", outcome)
            return Outcome.REQUEUE
        return outcome

    def _call_poison_hook(self, delivery: Delivery) -> None:
        if self._on_poison is None:
            return
        try:
            self._on_poison(delivery)
        except Exception:
            logger.exception("on_poison hook failed for message %s", delivery.message_id)

    def _settle(self, job: _InFlight, outcome: Outcome) -> None:
        """Connection thread: ack/reject/requeue a delivery exactly once."""
        if job.settled:
            logger.debug("ignoring late outcome %s of an already settled message", outcome.name)
            return
        job.settled = True
        if self._current is job:
            self._current = None
        channel, tag = job.channel, job.delivery.delivery_tag
        if not channel.is_open:
            logger.warning(
                "channel closed; message %s will be redelivered", job.delivery.message_id
            )
            return
        if outcome is Outcome.ACK:
            channel.basic_ack(tag)
        elif outcome is Outcome.REJECT:
            channel.basic_reject(tag, requeue=False)
        else:
            channel.basic_nack(tag, requeue=True)
        logger.info("message %s settled: %s", job.delivery.message_id, outcome.name)

    # ----------------------------------------------------------------- signals

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.getsignal(sig) for sig in signals}
        for sig in signals:
            signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.request_stop()  # no logging here: the logging lock may be held


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
    name = f"{settings.connection_name}-publisher"
    connection = BlockingConnection(settings.connection_parameters(connection_name=name))
    try:
        channel = connection.channel()
        declare_topology(channel, settings)
        channel.confirm_delivery()
        try:
            channel.basic_publish("", settings.queue, payload, properties, mandatory=True)
        except pika.exceptions.UnroutableError as exc:
            raise PublishError(
                f"message {message_id} could not be routed to {settings.queue!r}"
            ) from exc
        except pika.exceptions.NackError as exc:
            raise PublishError(f"the broker refused message {message_id} (nack)") from exc
    finally:
        if connection.is_open:
            connection.close()
    logger.info("published message %s to %r", message_id, settings.queue)
    return message_id
