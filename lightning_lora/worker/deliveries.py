"""What the consumer hands a handler, and what a handler hands back.

* :class:`Delivery`: one message (body, properties, headers, delivery count, publish time);
* :class:`Outcome` and :class:`Settlement`: ack, dead-letter (with a reason) or requeue a job;
* :class:`ControlReply`: what to do with a control message (the backend's cancels).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pika.spec import Basic, BasicProperties

__all__ = ["ControlReply", "Delivery", "Outcome", "Settlement"]


class Outcome(enum.Enum):
    """What to do with a message once its handler returned."""

    ACK = "ack"
    """Done: remove the message."""
    REJECT = "reject"
    """Never retry: dead-letter the message (``basic_reject(requeue=False)``)."""
    REQUEUE = "requeue"
    """Put the message back for a later delivery (e.g. on shutdown)."""


@dataclass(frozen=True)
class Settlement:
    """An outcome with the reason an operator sees on a dead-lettered message.

    Attributes:
        outcome: What to do with the message.
        reason: One line (the DLQ's ``x-lightning-lora-reason`` header).
        error_code: The failure code reported to the backend, if any.
    """

    outcome: Outcome
    reason: str = ""
    error_code: str | None = None


@dataclass(frozen=True)
class ControlReply:
    """What to do with a control message once its handler returned.

    Attributes:
        publish: Messages for the work queue, as ``(body, headers)``: published persistently,
            each confirmed by the broker, before the control message is acked (so a crash in
            between redelivers the control message, never loses what it asked for).
        reject: A reason to dead-letter the control message instead (it is not valid).
    """

    publish: tuple[tuple[bytes, Mapping[str, Any]], ...] = ()
    reject: str | None = None


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
