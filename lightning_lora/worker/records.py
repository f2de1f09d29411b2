"""The ledger's records, typed: what the fleet keeps in the bucket, one reader and writer each.

Every record is a frozen dataclass with ``to_json`` (its only writer) and ``from_json`` (its only
reader). The JSON keys are those earlier workers wrote, so a fleet can be upgraded one worker at
a time. Where a record lives is :mod:`lightning_lora.jobs.layout`'s; who writes it when is
:class:`~lightning_lora.worker.ledger.Ledger`'s.

* :class:`JobPointer`: the newest run (generation) of a job key;
* :class:`LeaseRecord`: which worker process trains a run now, until when;
* :class:`TerminalEvent`: a run's completion or failure webhook, fixed once created (same id,
  timestamp and body on every re-send);
* :class:`OutcomeRecord`: a run's terminal event and whether the backend acknowledged it;
* :class:`OutboxEntry`: a terminal event waiting for the backend, with its re-send schedule;
* :class:`CancelRecord`: a style's newest cancel and the window of runs it stops.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any, Literal, cast

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH
from lightning_lora.jobs.layout import run_id_for
from lightning_lora.worker.owners import ProcessOwner

__all__ = [
    "CancelRecord",
    "Holder",
    "JobPointer",
    "LeaseRecord",
    "OutboxEntry",
    "OutcomeRecord",
    "RecordError",
    "RunRef",
    "TerminalEvent",
    "TerminalKind",
]

TerminalKind = Literal["complete", "failed"]


class RecordError(ValueError):
    """A record in the bucket is not what the ledger writes (a field is missing or mistyped)."""


def _get(record: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = record.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        raise RecordError(f"field {name!r} is missing or not {_names(kind)}")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _types(kind))


def _number(record: Mapping[str, Any], name: str, default: float | None = None) -> float:
    value = record.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"field {name!r} is missing or not a number")
    return float(value)


@dataclasses.dataclass(frozen=True)
class RunRef:
    """One run of a job: what every record of it is keyed by.

    Attributes:
        style_id: The job's style.
        job_key: The job's key.
        generation: Which publication of the key.
        started_at: When the run's first delivery was seen (the store's clock; ``0.0`` when
            unknown). Not part of the run's identity: it only orders the run against a cancel.
    """

    style_id: int
    job_key: str
    generation: int
    started_at: float = dataclasses.field(default=0.0, compare=False)

    @property
    def run_id(self) -> str:
        """The run id (checkpoint folder name)."""
        return run_id_for(self.job_key, self.generation)


@dataclasses.dataclass(frozen=True)
class JobPointer:
    """The newest generation of a job key (``checkpoints/style_{id}/_jobs/{job_key}.json``)."""

    generation: int
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        """The record's JSON object."""
        return {"generation": self.generation, "updated_at": self.updated_at}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> JobPointer:
        """Read a stored pointer (``generation`` 1 when absent, as the first writers did)."""
        generation = record.get("generation", 1)
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
            raise RecordError("field 'generation' is not a positive int")
        return cls(generation, _number(record, "updated_at", 0.0))


@dataclasses.dataclass(frozen=True)
class CancelRecord:
    """A style's newest cancel (``checkpoints/style_{id}/_cancel.json``).

    A cancel stops every run of the style that had begun before its window closed (with a
    margin, :meth:`stops`): runs being trained or queued when the backend cancelled. The window
    opens when a worker takes the cancel message and closes when the barrier that worker put
    behind every queued job comes out of the work queue; jobs published after the cancel come
    after the barrier, so they train.

    Attributes:
        cancel_id: Names the cancel (the barrier carries it).
        requested_at: When a worker took the cancel (the store's clock).
        closed_at: When its barrier came out of the work queue, or ``None`` while it is queued.
    """

    cancel_id: str
    requested_at: float
    closed_at: float | None = None

    def stops(self, run: RunRef, margin_s: float = 0.0) -> bool:
        """Whether this cancel stops ``run``: it began before the window closed (+ ``margin_s``).

        The margin covers a job taken from the queue just before the barrier whose run is
        recorded just after the barrier's worker closed the window, and the store clocks of two
        workers differing by a round trip.
        """
        return self.closed_at is None or run.started_at < self.closed_at + margin_s

    def to_json(self) -> dict[str, Any]:
        """The record's JSON object."""
        return {
            "cancel_id": self.cancel_id,
            "requested_at": self.requested_at,
            "closed_at": self.closed_at,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> CancelRecord:
        """Read a stored cancel."""
        closed = record.get("closed_at")
        return cls(
            cancel_id=_get(record, "cancel_id", str),
            requested_at=_number(record, "requested_at"),
            closed_at=None if closed is None else _number(record, "closed_at"),
        )


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease: a worker process (``worker_id`` tells two ledgers of one apart)."""

    worker_id: str
    host: str
    pid: int
    create_time: float
    pid_ns: int | None = None

    @classmethod
    def this_process(cls) -> Holder:
        """The current process, with a random id so two ledgers in one process differ."""
        me = ProcessOwner.this_process()
        worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        return cls(worker_id, me.host, me.pid, me.create_time, me.pid_ns)

    @property
    def owner(self) -> ProcessOwner:
        """The holder's process (whether it is gone is :meth:`ProcessOwner.gone`'s rule)."""
        return ProcessOwner(self.host, self.pid, self.create_time, self.pid_ns)

    def to_json(self) -> dict[str, Any]:
        """The holder's JSON object."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Holder:
        """Read a stored holder (a holder without a usable process is never known gone)."""
        owner = ProcessOwner.from_json(record) or ProcessOwner("", 0, 0.0)
        worker_id = record.get("worker_id")
        return cls(
            worker_id if isinstance(worker_id, str) else "",
            owner.host,
            owner.pid,
            owner.create_time,
            owner.pid_ns,
        )


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """A run's lease (``checkpoints/style_{id}/{run_id}/lease.json``).

    Attributes:
        run_id: The run.
        holder: The worker process holding it.
        attempts: Times the run was taken (1 on the first; +1 per take-over after a crash).
        acquired_at: When the holder took it (the store's clock).
        expires_at: When it lapses without renewal (the store's clock).
        released: The holder gave it up without an outcome (a graceful stop, a requeue).
    """

    run_id: str
    holder: Holder
    attempts: int
    acquired_at: float
    expires_at: float
    released: bool = False

    def to_json(self) -> dict[str, Any]:
        """The record's JSON object."""
        return {
            "run_id": self.run_id,
            "holder": self.holder.to_json(),
            "attempts": self.attempts,
            "acquired_at": self.acquired_at,
            "expires_at": self.expires_at,
            "released": self.released,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> LeaseRecord:
        """Read a stored lease."""
        holder = record.get("holder")
        attempts = record.get("attempts", 0)
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise RecordError("field 'attempts' is not an int")
        return cls(
            run_id=str(record.get("run_id", "")),
            holder=Holder.from_json(holder if isinstance(holder, Mapping) else {}),
            attempts=attempts,
            acquired_at=_number(record, "acquired_at", 0.0),
            expires_at=_number(record, "expires_at", 0.0),
            released=bool(record.get("released", False)),
        )


@dataclasses.dataclass(frozen=True)
class TerminalEvent:
    """A run's terminal webhook, as created once and re-sent unchanged.

    Attributes:
        kind: ``"complete"`` or ``"failed"``.
        payload: The contract's body.
        event_id: ``Idempotency-Key``/``webhook-id`` of every send (derived from the run).
        timestamp: ``webhook-timestamp`` of every send (creation time, Unix seconds).
        webhook_url: The job's backend base URL.
        run_id: The run it ends.
        body_b64: The job's message body, base64 (dead-lettered if never acknowledged).
    """

    kind: TerminalKind
    payload: dict[str, Any]
    event_id: str
    timestamp: int
    webhook_url: str
    run_id: str
    body_b64: str

    @classmethod
    def create(
        cls,
        run: RunRef,
        kind: TerminalKind,
        payload: Mapping[str, Any],
        webhook_url: str,
        body: bytes,
        now: float,
    ) -> TerminalEvent:
        """A new terminal event of ``run``, created at ``now`` (Unix seconds)."""
        return cls(
            kind=kind,
            payload=dict(payload),
            event_id=f"ll-{run.run_id}-{kind}",
            timestamp=int(now),
            webhook_url=webhook_url,
            run_id=run.run_id,
            body_b64=base64.b64encode(body).decode("ascii"),
        )

    @property
    def method(self) -> str:
        """The HTTP method of the contract's terminal webhooks."""
        return "POST"

    @property
    def path(self) -> str:
        """The contract's path for this kind."""
        return COMPLETE_PATH if self.kind == "complete" else FAILED_PATH

    @property
    def body(self) -> bytes:
        """The job's message body."""
        return base64.b64decode(self.body_b64)

    @property
    def error_code(self) -> str | None:
        """A failure's code, ``None`` for a completion."""
        if self.kind != "failed":
            return None
        return str(self.payload.get("error_code") or "TRAINING_FAILED")

    def to_json(self) -> dict[str, Any]:
        """The event's JSON fields (``method`` and ``path`` included for readers of the bucket)."""
        return {
            "kind": self.kind,
            "method": self.method,
            "path": self.path,
            "payload": self.payload,
            "event_id": self.event_id,
            "timestamp": self.timestamp,
            "webhook_url": self.webhook_url,
            "run_id": self.run_id,
            "body_b64": self.body_b64,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TerminalEvent:
        """Read an event from an outcome or outbox record."""
        kind = record.get("kind")
        if kind not in ("complete", "failed"):
            raise RecordError("field 'kind' is not 'complete' or 'failed'")
        return cls(
            kind=cast(TerminalKind, kind),
            payload=dict(_get(record, "payload", dict)),
            event_id=_get(record, "event_id", str),
            timestamp=int(_number(record, "timestamp")),
            webhook_url=str(record.get("webhook_url", "")),
            run_id=str(record.get("run_id", "")),
            body_b64=str(record.get("body_b64", "")),
        )


@dataclasses.dataclass(frozen=True)
class OutcomeRecord:
    """A run's outcome (``checkpoints/style_{id}/{run_id}/outcome.json``), created once.

    Attributes:
        event: The terminal event.
        created_at: When it was created (the store's clock).
        delivered: The backend acknowledged it (2xx).
        delivered_at: When it did.
    """

    event: TerminalEvent
    created_at: float
    delivered: bool = False
    delivered_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The record's JSON object."""
        record = {**self.event.to_json(), "delivered": self.delivered}
        record["created_at"] = self.created_at
        if self.delivered_at is not None:
            record["delivered_at"] = self.delivered_at
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> OutcomeRecord:
        """Read a stored outcome."""
        delivered_at = record.get("delivered_at")
        return cls(
            event=TerminalEvent.from_json(record),
            created_at=_number(record, "created_at", 0.0),
            delivered=bool(record.get("delivered", False)),
            delivered_at=float(delivered_at) if isinstance(delivered_at, int | float) else None,
        )


@dataclasses.dataclass(frozen=True)
class OutboxEntry:
    """A terminal event the backend has not acknowledged yet (``outbox/style_{id}/{run}.json``).

    Attributes:
        event: The terminal event.
        run: Its run.
        created_at: When the event was created (the outbox's window counts from it).
        attempts: Re-sends claimed so far.
        next_attempt_at: When the next re-send is due (the store's clock).
    """

    event: TerminalEvent
    run: RunRef
    created_at: float
    attempts: int = 0
    next_attempt_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The record's JSON object."""
        return {
            **self.event.to_json(),
            "delivered": False,
            "created_at": self.created_at,
            "style_id": self.run.style_id,
            "job_key": self.run.job_key,
            "generation": self.run.generation,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> OutboxEntry:
        """Read a stored outbox entry."""
        attempts = record.get("attempts", 0)
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise RecordError("field 'attempts' is not an int")
        run = RunRef(
            _get(record, "style_id", int),
            _get(record, "job_key", str),
            _get(record, "generation", int),
        )
        return cls(
            event=TerminalEvent.from_json(record),
            run=run,
            created_at=_number(record, "created_at", 0.0),
            attempts=attempts,
            next_attempt_at=_number(record, "next_attempt_at", 0.0),
        )
