"""A thin, robust RabbitMQ consumer (pika) that knows nothing about training.

Design (after pika's ``examples/basic_consumer_threaded.py``):

* One ``BlockingConnection`` owned by the thread that calls :meth:`Consumer.run` (the
  *connection thread*). It loops on ``connection.process_data_events`` so heartbeats keep being
  answered while a job runs.
* ``prefetch_count=1`` and manual acks: one job at a time. Each delivery is handled on a worker
  thread; its :class:`Outcome` goes back to the connection thread through
  ``connection.add_callback_threadsafe``, which acks (``ACK``), dead-letters (``REJECT``: the
  message is published to the dead-letter queue with its reason under publisher confirms, then
  acked; see :func:`~lightning_lora.worker.broker.dead_letter`) or requeues (``REQUEUE``:
  ``basic_nack(requeue=True)``). A handler may return a :class:`Settlement` to give the reason.
* Poison messages on a quorum queue: a delivery whose ``x-delivery-count`` is
  ``>= delivery_limit`` is not handed to the handler; the optional ``on_poison`` hook runs (e.g.
  to send a failure webhook) and the message is dead-lettered. Classic queues carry no count:
  the worker counts attempts itself (:mod:`lightning_lora.worker.ledger`).
* Connection loss (``AMQPConnectionError``, ``StreamLostError``, ``ConnectionClosedByBroker``,
  a channel closed by the broker, a consumer cancelled by the broker ...) is followed by a
  reconnect with bounded, jittered exponential backoff. A job that is running when the
  connection dies keeps running; its outcome cannot be acknowledged any more, so the broker
  redelivers the message once the worker reconnects (after the job ended, so that two runs of
  the same job never overlap). **Handlers must therefore be idempotent.**
* Control messages (cancels, ``on_control``) come from ``BrokerSettings.cancels``: at connect
  before the first job, later on threads of their own. A :class:`ControlReply` says what to
  publish to the work queue (confirmed) before the ack, or why to dead-letter it.
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
``PRECONDITION_FAILED`` and the message is redelivered (the job keeps running under its lease
and the redelivery acks its outcome: :mod:`lightning_lora.worker.ledger`). Raise it on
the broker to more than the longest training, e.g. ``consumer_timeout = 86400000`` in
``rabbitmq.conf`` (or at runtime:
``rabbitmqctl eval 'application:set_env(rabbit, consumer_timeout, 86400000).'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from lightning_lora.clients.backoff import backoff_delay
from lightning_lora.worker.broker import (
    BrokerSettings,
    TopologyError,
    dead_letter,
    declare_topology,
)
from lightning_lora.worker.deliveries import ControlReply, Delivery, Outcome, Settlement

logger = logging.getLogger(__name__)

RECOVERABLE_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    OSError,
)
"""Errors after which :meth:`Consumer.run` reconnects instead of giving up."""
_LOCAL_COUNT_CAPACITY = 10_000


@dataclass
class _InFlight:
    """A delivery being handled; touched by the connection thread only (``settled``)."""

    channel: BlockingChannel
    delivery: Delivery
    settled: bool = False


Handler = Callable[[Delivery], "Outcome | Settlement"]
PoisonHook = Callable[[Delivery], None]
ControlHandler = Callable[[Delivery], ControlReply]


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
        on_io: Called after every round of broker I/O (heartbeats included), e.g. for metrics.
        on_control: Handles a control message (see :class:`ControlReply`); ``None``: the
            control queue is not consumed. An exception requeues the message.

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
        on_io: Callable[[], None] | None = None,
        on_control: ControlHandler | None = None,
    ) -> None:
        self.settings = settings
        self._handler = handler
        self._on_poison = on_poison
        self._grace_period = grace_period
        self._poll_interval = poll_interval
        self._on_io = on_io
        self._on_control = on_control
        self._stop = threading.Event()
        self._stop_at: float | None = None
        self.consuming = threading.Event()
        self.connections_made = 0
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self._dlq_channel: BlockingChannel | None = None
        self._local_counts: dict[str, int] = {}
        self.last_broker_io: float | None = None
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
        """Reconnect delay: uniform in [d/2, d], d = min(max, initial * 2**attempt)."""
        s = self.settings
        return backoff_delay(attempt, s.reconnect_initial_delay, s.reconnect_max_delay, low=0.5)

    def _connect(self) -> None:
        params = self.settings.connection_parameters()
        self._connection = BlockingConnection(params)
        channel = self._connection.channel()
        declare_topology(channel, self.settings)
        channel.basic_qos(prefetch_count=1)
        self._dlq_channel = self._connection.channel()
        self._dlq_channel.confirm_delivery()
        self._cancelled_by_broker = False
        channel.add_on_cancel_callback(self._on_broker_cancel)
        if self._on_control is not None:
            self._take_waiting_control(channel)
            channel.basic_consume(self.settings.cancels, self._on_control_message, auto_ack=False)
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
            self.last_broker_io = time.monotonic()
            if self._on_io is not None:
                self._on_io()
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
        self._dlq_channel = None
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
        delivery = self._with_local_count(delivery)
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

    @staticmethod
    def _key(delivery: Delivery) -> str:
        return delivery.message_id or hashlib.sha256(delivery.body).hexdigest()

    def _with_local_count(self, delivery: Delivery) -> Delivery:
        """Count the handler's failures on a message where the queue gives no count.

        Classic queues have no ``x-delivery-count``: the times the handler raised on a message
        (keyed by message id, else the body's hash) are counted here while it keeps coming
        back with the ``redelivered`` flag. A requeue the handler asked for (shutdown, S3 down)
        does not count, and a first delivery starts again from 0, so a new publication of the
        same body is never poison. Crashes of the whole process are counted by the worker.
        """
        key = self._key(delivery)
        if not delivery.redelivered:
            self._local_counts.pop(key, None)
            return delivery
        failures = self._local_counts.get(key, 0)
        if failures <= delivery.delivery_count:
            return delivery
        return dataclasses.replace(delivery, delivery_count=failures)

    def _count_failure(self, delivery: Delivery) -> None:
        self._local_counts[self._key(delivery)] = delivery.delivery_count + 1
        while len(self._local_counts) > _LOCAL_COUNT_CAPACITY:
            self._local_counts.pop(next(iter(self._local_counts)))

    def _work(self, connection: BlockingConnection, job: _InFlight) -> None:
        """Worker thread: run the handler and hand the outcome back to the connection thread."""
        outcome = Settlement(Outcome.REQUEUE)
        try:
            outcome = self._process(job.delivery)
        finally:
            try:
                connection.add_callback_threadsafe(functools.partial(self._settle, job, outcome))
            except Exception as exc:  # the connection is gone: the broker will redeliver
                logger.warning(
                    "could not report outcome %s of message %s (%s); it will be redelivered",
                    outcome.outcome.name,
                    job.delivery.message_id,
                    type(exc).__name__,
                )

    def _process(self, delivery: Delivery) -> Settlement:
        limit = self.settings.delivery_limit
        if delivery.delivery_count >= limit:
            reason = f"delivered {delivery.delivery_count} times (limit {limit})"
            logger.error("message %s %s; dead-lettering it", delivery.message_id, reason)
            self._call_poison_hook(delivery)
            return Settlement(Outcome.REJECT, reason, "REDELIVERY_LIMIT")
        try:
            outcome = self._handler(delivery)
        except Exception as exc:
            self._count_failure(delivery)
            retry = delivery.delivery_count < limit
            logger.exception(
                "handler failed on message %s; %s",
                delivery.message_id,
                "requeueing" if retry else "dead-lettering",
            )
            reason = f"the worker's handler raised {type(exc).__name__}"
            return Settlement(Outcome.REQUEUE if retry else Outcome.REJECT, reason)
        self._local_counts.pop(self._key(delivery), None)
        if isinstance(outcome, Outcome):
            return Settlement(outcome)
        if not isinstance(outcome, Settlement):
            logger.error("handler returned %r instead of an Outcome; requeueing", outcome)
            return Settlement(Outcome.REQUEUE)
        return outcome

    def _call_poison_hook(self, delivery: Delivery) -> None:
        if self._on_poison is None:
            return
        try:
            self._on_poison(delivery)
        except Exception:
            logger.exception("on_poison hook failed for message %s", delivery.message_id)

    def _settle(self, job: _InFlight, settlement: Settlement | Outcome) -> None:
        """Connection thread: ack/dead-letter/requeue a delivery exactly once."""
        if isinstance(settlement, Outcome):
            settlement = Settlement(settlement)
        outcome = settlement.outcome
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
            if not self._dead_letter(job.delivery, settlement):
                outcome = Outcome.REQUEUE
                channel.basic_nack(tag, requeue=True)
            else:
                channel.basic_ack(tag)
        else:
            channel.basic_nack(tag, requeue=True)
        logger.info("message %s settled: %s", job.delivery.message_id, outcome.name)

    def _dead_letter(self, delivery: Delivery, settlement: Settlement) -> bool:
        """Publish the delivery to the DLQ (confirmed); ``False`` if that failed."""
        channel = self._dlq_channel
        reason = settlement.reason or "rejected by the worker"
        try:
            if channel is None or not channel.is_open:
                raise pika.exceptions.ChannelClosed(0, "no dead-letter channel")
            dead_letter(
                channel,
                self.settings,
                delivery.body,
                delivery.properties,
                reason,
                settlement.error_code,
            )
        except Exception as exc:  # keep the message: requeue rather than lose it
            logger.error(
                "message %s could not be dead-lettered (%s: %s); requeueing it",
                delivery.message_id,
                type(exc).__name__,
                exc,
            )
            return False
        return True

    # ----------------------------------------------------------------- control messages

    def _take_waiting_control(self, channel: BlockingChannel) -> None:
        """At connect, before any job: handle the waiting control messages.

        A cancel is then in force before its job is taken; a failing one is requeued, ending this.
        """
        while not self._stop.is_set():
            method, properties, body = channel.basic_get(self.settings.cancels, auto_ack=False)
            if method is None:
                return
            delivery = Delivery.from_amqp(method, properties, body, self._stop)
            reply = self._control_reply(delivery)
            self._settle_control(channel, delivery, reply)
            if reply is None:
                return

    def _on_control_message(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        """Connection-thread callback: handle a control message on a thread of its own."""
        delivery = Delivery.from_amqp(method, properties, body, self._stop)
        connection = self._connection
        assert connection is not None

        def work() -> None:
            reply = self._control_reply(delivery)
            settle = functools.partial(self._settle_control, channel, delivery, reply)
            try:
                connection.add_callback_threadsafe(settle)
            except Exception as exc:  # the connection is gone: the broker will redeliver
                logger.warning("control message not settled (%s); it comes back", exc)

        threading.Thread(target=work, name=f"control-{method.delivery_tag}", daemon=True).start()

    def _control_reply(self, delivery: Delivery) -> ControlReply | None:
        """The handler's reply, or ``None`` (requeue) when it raised."""
        assert self._on_control is not None
        try:
            return self._on_control(delivery)
        except Exception:
            logger.exception("control handler failed; requeueing the control message")
            return None

    def _settle_control(
        self, channel: BlockingChannel, delivery: Delivery, reply: ControlReply | None
    ) -> None:
        """Connection thread: publish what the reply asks for, then ack (or requeue)."""
        tag = delivery.delivery_tag
        if not channel.is_open:  # the broker redelivers it
            return
        try:
            if reply is None:
                # after a short pause, so that a store outage does not spin the message
                self._stop.wait(min(5.0, self.settings.reconnect_initial_delay))
                channel.basic_nack(tag, requeue=True)
                return
            if reply.reject is not None:
                reason = f"control message refused: {reply.reject}"
                logger.error("%s", reason)
                if not self._dead_letter(delivery, Settlement(Outcome.REJECT, reason)):
                    channel.basic_nack(tag, requeue=True)
                    return
            for body, headers in reply.publish:
                self._publish_to_work_queue(body, headers)
            channel.basic_ack(tag)
        except Exception as exc:  # keep the control message: it is handled again
            logger.error("control message requeued (%s: %s)", type(exc).__name__, exc)
            if channel.is_open:
                channel.basic_nack(tag, requeue=True)

    def _publish_to_work_queue(self, body: bytes, headers: Mapping[str, Any]) -> None:
        """Publish persistently to the work queue and wait for the broker's confirm."""
        channel = self._dlq_channel
        if channel is None or not channel.is_open:
            raise pika.exceptions.ChannelClosed(0, "no confirm channel")
        properties = BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent.value,
            timestamp=int(time.time()),
            app_id="lightning_lora",
            headers=dict(headers),
        )
        channel.basic_publish("", self.settings.queue, body, properties, mandatory=True)

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
