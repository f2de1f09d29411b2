"""The ledger's records (``lightning_lora.worker.records``): one writer and one reader each.

Every record reads back what it writes (also through JSON text, as S3 stores it), reads the JSON
that earlier workers wrote (a fleet is upgraded one worker at a time), and refuses a malformed
record with :class:`RecordError` instead of guessing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH
from lightning_lora.worker.owners import ProcessOwner
from lightning_lora.worker.records import (
    Holder,
    JobPointer,
    LeaseRecord,
    OutboxEntry,
    OutcomeRecord,
    RecordError,
    RunRef,
    TerminalEvent,
)

RUN = RunRef(style_id=7, job_key="sha-0123456789abcdef0123456789abcdef", generation=2)
BODY = b'{"style_id": 7, "image_urls": ["s3://bkt/a.png"], "webhook_url": "http://backend:8000"}'
HOLDER = Holder("host-a:41:abcd1234", "host-a", 41, 1_700_000_000.25, 4026531836)


def _stored(record: dict[str, Any]) -> dict[str, Any]:
    """The record as a reader gets it back from S3 (JSON text)."""
    return json.loads(json.dumps(record))


def _event(kind: str = "complete") -> TerminalEvent:
    payload: dict[str, Any] = (
        {"style_id": 7, "model_url": "s3://bkt/models/style_7/lora_weights.safetensors"}
        | {"metadata": {"training_epochs": 2, "lora_rank": 16, "lora_alpha": 32}}
        if kind == "complete"
        else {"style_id": 7, "error_message": "no images", "error_code": "INVALID_DATASET"}
    )
    return TerminalEvent.create(RUN, kind, payload, "http://backend:8000", BODY, 1_700_000_123.9)  # type: ignore[arg-type]


def test_a_terminal_event_is_fixed_at_creation() -> None:
    done = _event("complete")
    assert done.event_id == f"ll-{RUN.run_id}-complete" and RUN.run_id.endswith(".g2")
    assert done.timestamp == 1_700_000_123  # whole seconds: webhook-timestamp
    assert (done.method, done.path, done.error_code) == ("POST", COMPLETE_PATH, None)
    assert done.body == BODY and done.run_id == RUN.run_id
    failed = _event("failed")
    assert (failed.path, failed.error_code) == (FAILED_PATH, "INVALID_DATASET")
    assert failed.event_id != done.event_id


RECORDS: dict[str, tuple[object, Callable[[dict[str, Any]], object]]] = {
    "job-pointer": (JobPointer(3, 1_700_000_000.5), JobPointer.from_json),
    "holder": (HOLDER, Holder.from_json),
    "holder-without-namespace": (Holder("w", "h", 9, 1.5), Holder.from_json),
    "lease": (
        LeaseRecord(RUN.run_id, HOLDER, 2, 1_700_000_000.0, 1_700_000_060.0),
        LeaseRecord.from_json,
    ),
    "released-lease": (
        LeaseRecord(RUN.run_id, HOLDER, 3, 1_700_000_000.0, 0.0, released=True),
        LeaseRecord.from_json,
    ),
    "completion": (_event("complete"), TerminalEvent.from_json),
    "failure": (_event("failed"), TerminalEvent.from_json),
    "outcome": (OutcomeRecord(_event("complete"), 1_700_000_124.0), OutcomeRecord.from_json),
    "delivered-outcome": (
        OutcomeRecord(_event("failed"), 1_700_000_124.0, True, 1_700_000_130.5),
        OutcomeRecord.from_json,
    ),
    "outbox-entry": (
        OutboxEntry(_event("complete"), RUN, 1_700_000_124.0, 4, 1_700_000_500.0),
        OutboxEntry.from_json,
    ),
}


@pytest.mark.parametrize("name", list(RECORDS))
def test_every_record_reads_back_what_it_writes(name: str) -> None:
    record, read = RECORDS[name]
    written = record.to_json()  # type: ignore[attr-defined]
    assert read(_stored(written)) == record
    assert read(_stored(written)).to_json() == written  # type: ignore[attr-defined]


def test_a_lease_written_by_an_earlier_worker_is_read() -> None:
    """The lease of a worker that did not record its pid namespace (before ``pid_ns``)."""
    old = {
        "run_id": "run-42",
        "holder": {
            "worker_id": "worker-1:812:9f8e7d6c",
            "host": "worker-1",
            "pid": 812,
            "create_time": 1764600000.12,
        },
        "attempts": 2,
        "acquired_at": 1764600100.5,
        "expires_at": 1764600160.5,
        "released": False,
    }
    lease = LeaseRecord.from_json(old)
    assert lease == LeaseRecord(
        run_id="run-42",
        holder=Holder("worker-1:812:9f8e7d6c", "worker-1", 812, 1764600000.12, None),
        attempts=2,
        acquired_at=1764600100.5,
        expires_at=1764600160.5,
        released=False,
    )
    # an unknown namespace is never judged from here: the holder counts as possibly alive
    assert lease.holder.owner == ProcessOwner("worker-1", 812, 1764600000.12, None)
    assert lease.holder.owner.gone() is None


def _old_event_fields(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": kind,
        "method": "POST",
        "path": COMPLETE_PATH if kind == "complete" else FAILED_PATH,
        "payload": payload,
        "event_id": f"ll-run-42-{kind}",
        "timestamp": 1764600200,
        "webhook_url": "http://backend:8000",
        "run_id": "run-42",
        "body_b64": base64.b64encode(BODY).decode("ascii"),
    }


def test_an_outcome_written_by_an_earlier_worker_is_read() -> None:
    payload = {"style_id": 7, "error_message": "no images", "error_code": "INVALID_DATASET"}
    old = {
        **_old_event_fields("failed", payload),
        "delivered": True,
        "created_at": 1764600200.75,
        "delivered_at": 1764600201.0,
    }
    outcome = OutcomeRecord.from_json(old)
    assert outcome.delivered and outcome.delivered_at == 1764600201.0
    assert outcome.created_at == 1764600200.75
    event = outcome.event
    assert (event.kind, event.path, event.error_code) == ("failed", FAILED_PATH, "INVALID_DATASET")
    assert (event.event_id, event.timestamp) == ("ll-run-42-failed", 1764600200)
    assert event.payload == payload and event.body == BODY
    assert outcome.to_json() == old  # written back with the same keys


def test_an_outbox_entry_written_by_an_earlier_worker_is_read() -> None:
    payload = {"style_id": 7, "model_url": "s3://bkt/m.safetensors", "metadata": {}}
    old = {
        **_old_event_fields("complete", payload),
        "delivered": False,
        "created_at": 1764600200.75,
        "style_id": 7,
        "job_key": "run-42",
        "generation": 1,
        "attempts": 3,
        "next_attempt_at": 1764600245.0,
    }
    entry = OutboxEntry.from_json(old)
    assert entry.run == RunRef(7, "run-42", 1) and entry.run.run_id == "run-42"
    assert (entry.attempts, entry.next_attempt_at, entry.created_at) == (
        3,
        1764600245.0,
        1764600200.75,
    )
    assert entry.event.event_id == "ll-run-42-complete" and entry.event.payload == payload
    assert entry.to_json() == old


def test_a_job_pointer_of_the_first_writers_is_generation_one() -> None:
    assert JobPointer.from_json({"updated_at": 1764600000.0}) == JobPointer(1, 1764600000.0)
    assert JobPointer.from_json({}) == JobPointer(1, 0.0)


def test_a_holder_without_a_usable_process_is_never_known_gone() -> None:
    holder = Holder.from_json({"worker_id": "w", "host": "h"})  # no pid, no create time
    assert (holder.pid, holder.create_time) == (0, 0.0)
    assert holder.owner.gone() is None


def test_this_process_holds_as_itself() -> None:
    first, second = Holder.this_process(), Holder.this_process()
    assert first.worker_id != second.worker_id  # two ledgers of one process differ
    assert first.owner == second.owner == ProcessOwner.this_process()
    assert first.owner.gone() is None


_EVENT = _event("complete").to_json()
_OUTBOX = OutboxEntry(_event("complete"), RUN, 1.0).to_json()
_LEASE = LeaseRecord(RUN.run_id, HOLDER, 1, 1.0, 2.0).to_json()

MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], object], dict[str, Any], str]] = {
    "pointer-generation-zero": (JobPointer.from_json, {"generation": 0}, "generation"),
    "pointer-generation-bool": (JobPointer.from_json, {"generation": True}, "generation"),
    "pointer-generation-text": (JobPointer.from_json, {"generation": "2"}, "generation"),
    "pointer-time-text": (JobPointer.from_json, {"updated_at": "now"}, "updated_at"),
    "lease-attempts-text": (LeaseRecord.from_json, {**_LEASE, "attempts": "1"}, "attempts"),
    "lease-attempts-bool": (LeaseRecord.from_json, {**_LEASE, "attempts": True}, "attempts"),
    "lease-expiry-text": (LeaseRecord.from_json, {**_LEASE, "expires_at": "soon"}, "expires_at"),
    "event-unknown-kind": (TerminalEvent.from_json, {**_EVENT, "kind": "done"}, "kind"),
    "event-no-kind": (
        TerminalEvent.from_json,
        {k: v for k, v in _EVENT.items() if k != "kind"},
        "kind",
    ),
    "event-payload-list": (TerminalEvent.from_json, {**_EVENT, "payload": []}, "payload"),
    "event-no-id": (TerminalEvent.from_json, {**_EVENT, "event_id": None}, "event_id"),
    "event-no-timestamp": (
        TerminalEvent.from_json,
        {k: v for k, v in _EVENT.items() if k != "timestamp"},
        "timestamp",
    ),
    "event-timestamp-bool": (TerminalEvent.from_json, {**_EVENT, "timestamp": False}, "timestamp"),
    "outcome-created-text": (
        OutcomeRecord.from_json,
        {**_EVENT, "created_at": "yesterday"},
        "created_at",
    ),
    "outbox-style-text": (OutboxEntry.from_json, {**_OUTBOX, "style_id": "7"}, "style_id"),
    "outbox-style-bool": (OutboxEntry.from_json, {**_OUTBOX, "style_id": True}, "style_id"),
    "outbox-no-job-key": (
        OutboxEntry.from_json,
        {k: v for k, v in _OUTBOX.items() if k != "job_key"},
        "job_key",
    ),
    "outbox-generation-float": (
        OutboxEntry.from_json,
        {**_OUTBOX, "generation": 1.0},
        "generation",
    ),
    "outbox-attempts-text": (OutboxEntry.from_json, {**_OUTBOX, "attempts": "0"}, "attempts"),
    "outbox-event-missing": (OutboxEntry.from_json, {**_OUTBOX, "kind": None}, "kind"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_record_raises_record_error_naming_the_field(case: str) -> None:
    read, record, field = MALFORMED[case]
    with pytest.raises(RecordError, match=field):
        read(record)
    assert issubclass(RecordError, ValueError)
