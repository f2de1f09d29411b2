"""The outbox (``lightning_lora.worker.outbox``): terminal webhooks kept until the backend takes
them, on moto's S3 server and a real HTTP receiver.

:class:`Outbox` re-sends a refused entry later as the same event (same ``webhook-id``,
``webhook-timestamp`` and body bytes), dead-letters it past its window, and never sends to a URL
that left the allowlist; :class:`DurableSink` records a run's outcome once, so a second sink for
the run reports nothing. The ledger's clock is a :class:`~tests.support.clock.FakeClock`: a
re-send falls due when the test moves it. Then, end to end through the worker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import pytest

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.clients.webhook_client import WebhookClient, verify_webhook
from lightning_lora.jobs.layout import outbox_key
from lightning_lora.worker.broker import publish_dead_letter
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.ledger import Ledger
from lightning_lora.worker.outbox import DurableSink, Outbox
from lightning_lora.worker.records import RunRef, TerminalEvent
from tests.support.broker import depth, get, running, wait_for
from tests.support.clock import FakeClock
from tests.support.receiver import Reply, WebhookReceiver
from tests.support.webhooks import TOKEN
from tests.support.worker_stack import _accepted, _delivery, _guide_publish, _job, _worker

RUN = RunRef(7, "run-1", 1)
KEY = outbox_key(7, "run-1")
BODY = b'{"style_id": 7, "image_urls": ["s3://bkt/a.png"]}'
MODEL_URL = "s3://bkt/models/style_7/lora_weights.safetensors"
METADATA = {"training_epochs": 1, "lora_rank": 4, "lora_alpha": 4}
WINDOW_S = 3600.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(s3_env: S3Storage, clock: FakeClock) -> Ledger:
    return Ledger(s3_env, 60.0, clock)


def _client(url: str) -> WebhookClient:
    """A quick client: two attempts for a first delivery (the outbox sends once per scan)."""
    return WebhookClient(
        url, token=TOKEN, timeout_s=2, max_attempts=2, max_total_s=5, backoff_base_s=0.01
    )


def _outbox(ledger: Ledger, allowlist: tuple[str, ...] = ("127.0.0.1",), **options: Any) -> Outbox:
    return Outbox(ledger, _client, list(allowlist), window_s=WINDOW_S, **options)


def _pending(ledger: Ledger, receiver: WebhookReceiver) -> TerminalEvent:
    """A completion of ``RUN`` to the receiver, recorded and due in the outbox now."""
    payload = {"style_id": 7, "model_url": MODEL_URL, "metadata": METADATA}
    event = ledger.new_event(RUN, "complete", payload, receiver.base_url, BODY)
    assert ledger.create_outcome(RUN, event)
    return event


def _same_event(requests: list, event: TerminalEvent) -> None:
    for request in requests:
        assert request.header("webhook-id") == request.header("Idempotency-Key") == event.event_id
        assert request.header("webhook-timestamp") == str(event.timestamp)
        assert request.body == requests[0].body
    assert json.loads(requests[0].body) == event.payload


def test_a_refused_entry_is_kept_and_resent_later_as_the_same_event(
    ledger: Ledger, clock: FakeClock, webhook_receiver: WebhookReceiver
) -> None:
    event = _pending(ledger, webhook_receiver)
    webhook_receiver.script(COMPLETE_PATH, 503, Reply(500))
    outbox = _outbox(ledger, backoff_base_s=5.0, backoff_max_s=60.0)
    assert outbox.run_once() == 0  # refused (503)
    entry, _ = ledger.outbox_entry(KEY)  # type: ignore[misc]
    assert entry.attempts == 1 and clock() + 2.5 <= entry.next_attempt_at <= clock() + 5
    assert outbox.run_once() == 0  # not due yet: nothing is sent
    assert len(webhook_receiver.requests) == 1
    clock.now = entry.next_attempt_at
    assert outbox.run_once() == 0  # refused again (500); the next delay grows
    entry, _ = ledger.outbox_entry(KEY)  # type: ignore[misc]
    assert entry.attempts == 2 and clock() + 7.5 <= entry.next_attempt_at <= clock() + 15
    clock.now = entry.next_attempt_at
    assert outbox.run_once() == 1  # taken
    sent = webhook_receiver.requests_to(COMPLETE_PATH)
    assert [r.status for r in sent] == [503, 500, 200]
    _same_event(sent, event)
    assert ledger.outbox_keys() == []
    outcome = ledger.outcome(RUN)
    assert outcome is not None and outcome.delivered and outcome.event == event
    clock.advance(86_400)
    assert outbox.run_once() == 0 and len(webhook_receiver.requests) == 3  # never again


def test_a_durable_sink_hands_a_refused_first_delivery_to_the_outbox(
    ledger: Ledger, clock: FakeClock, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script(COMPLETE_PATH, 503, 503)  # down for the first delivery's attempts
    pending: list[RunRef] = []
    url = webhook_receiver.base_url
    sink = DurableSink(ledger, RUN, url, _client(url), BODY, on_pending=pending.append)
    try:
        assert sink.complete(7, MODEL_URL, METADATA) is True  # taken: it is the run's report
    finally:
        sink.close()
    assert sink.delivered is False and pending == [RUN]
    entry, _ = ledger.outbox_entry(KEY)  # type: ignore[misc]
    assert entry.next_attempt_at == clock()  # the hold is lifted: due now
    outcome = ledger.outcome(RUN)
    assert outcome is not None and not outcome.delivered
    assert _outbox(ledger).run_once() == 1
    sent = webhook_receiver.requests_to(COMPLETE_PATH)
    assert [r.status for r in sent] == [503, 503, 200]
    _same_event(sent, outcome.event)
    assert ledger.outcome(RUN).delivered and ledger.outbox_keys() == []  # type: ignore[union-attr]


def test_a_run_is_reported_by_one_durable_sink_only(
    s3_env: S3Storage, clock: FakeClock, webhook_receiver: WebhookReceiver
) -> None:
    """Two workers' sinks for one run (a redelivery handled twice): the second says nothing."""
    url = webhook_receiver.base_url
    first, second = (
        DurableSink(Ledger(s3_env, 60.0, clock), RUN, url, _client(url), BODY) for _ in range(2)
    )
    try:
        assert first.complete(7, MODEL_URL, METADATA) is True and first.delivered is True
        assert second.failed(7, "a late failure", "TRAINING_FAILED") is False
        assert second.complete(7, MODEL_URL, METADATA) is False
        assert second.delivered is None
    finally:
        first.close()
        second.close()
    assert [r.path for r in webhook_receiver.requests] == [COMPLETE_PATH]
    assert webhook_receiver.requests_to(FAILED_PATH) == []
    outcome = first.ledger.outcome(RUN)
    assert outcome is not None and outcome.delivered and outcome.event.kind == "complete"
    assert first.ledger.outbox_keys() == []


def test_past_its_window_an_entry_is_dead_lettered_once_and_removed(
    ledger: Ledger, clock: FakeClock, webhook_receiver: WebhookReceiver, caplog
) -> None:
    caplog.set_level(logging.ERROR, logger="lightning_lora.worker.outbox")
    webhook_receiver.set_default(503, path=COMPLETE_PATH)
    dead: list[tuple[bytes, dict[str, Any]]] = []

    def dead_letter(body: bytes, headers: Mapping[str, Any]) -> None:
        dead.append((body, dict(headers)))

    event = _pending(ledger, webhook_receiver)
    outbox = _outbox(ledger, dead_letter=dead_letter, backoff_base_s=5.0)
    clock.advance(WINDOW_S)  # the last moment of the window: still sent
    assert outbox.run_once() == 0 and len(webhook_receiver.requests) == 1
    clock.advance(10)  # due again, and past the window
    assert outbox.run_once() == 0
    assert len(webhook_receiver.requests) == 1  # not sent again
    assert len(dead) == 1
    body, headers = dead[0]
    assert body == BODY
    assert headers["x-lightning-lora-run-id"] == RUN.run_id
    assert headers["x-lightning-lora-event-id"] == event.event_id
    assert "not acknowledged" in headers["x-lightning-lora-reason"]
    assert "(1 attempts)" in headers["x-lightning-lora-reason"]
    assert ledger.outbox_keys() == []
    assert outbox.run_once() == 0 and len(dead) == 1  # once
    assert f"style 7, run {RUN.run_id}) dead-lettered" in caplog.text
    outcome = ledger.outcome(RUN)
    assert outcome is not None and not outcome.delivered  # never acknowledged


def test_an_entry_whose_url_left_the_allowlist_is_not_sent(
    ledger: Ledger, webhook_receiver: WebhookReceiver, caplog
) -> None:
    caplog.set_level(logging.ERROR, logger="lightning_lora.worker.outbox")
    _pending(ledger, webhook_receiver)
    outbox = _outbox(ledger, allowlist=("backend:8000",))
    assert outbox.run_once() == 0
    assert outbox.attempt(KEY, force=True) is False
    assert webhook_receiver.requests == []
    assert "left the allowlist" in caplog.text
    found = ledger.outbox_entry(KEY)
    assert found is None or found[0].attempts == 0  # no send was claimed
    outcome = ledger.outcome(RUN)
    assert outcome is not None and not outcome.delivered


def test_the_outbox_thread_sends_due_entries_until_stopped(
    ledger: Ledger, webhook_receiver: WebhookReceiver
) -> None:
    event = _pending(ledger, webhook_receiver)
    scans: list[int] = []
    outbox = _outbox(ledger, poll_s=0.05)
    outbox.on_scan = scans.append
    outbox.start()
    try:
        assert wait_for(lambda: ledger.outbox_keys() == [], 30)
    finally:
        outbox.stop()
    assert outbox._thread is not None and not outbox._thread.is_alive()
    sent = webhook_receiver.requests_to(COMPLETE_PATH)
    assert len(sent) == 1
    _same_event(sent, event)
    assert scans and scans[0] == 1


SIGNING_SECRET = "whsec_" + "c2lnbmluZy1zZWNyZXQtZm9yLXRlc3Rz"


@pytest.mark.slow
def test_a_completion_is_kept_and_resent_until_the_backend_takes_it(stack) -> None:
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    receiver.script(COMPLETE_PATH, *([503] * 6))  # down for the first delivery and 2 re-sends
    worker = _worker(
        stack,
        "trainer.max_epochs=1",
        "reporting.client.max_total_s=1",
        "reporting.client.max_attempts=2",
        "reporting.client.backoff_base_s=0.1",
        outbox_backoff_base_s=0.2,
        outbox_backoff_max_s=0.5,
        webhook_signing_secret=SIGNING_SECRET,
    )
    with running(Consumer(broker, worker.handle, poll_interval=0.2)):
        _guide_publish(broker, _job(stack, 231))
        assert wait_for(lambda: worker.jobs_done == 1 and depth(broker.queue) == 0, 240)
    assert len(storage.list_keys("outbox/")) == 1  # acked, but the report is still pending
    deadline = time.monotonic() + 60
    while not _accepted(receiver, COMPLETE_PATH, 231) and time.monotonic() < deadline:
        worker.outbox.run_once()
        time.sleep(0.2)
    attempts = [r for r in receiver.requests_to(COMPLETE_PATH) if r.json["style_id"] == 231]
    assert [r.status for r in attempts][-1] == 200 and len(attempts) >= 4
    # one event: same id, timestamp and body every time; signed; never retrained
    for name in ("Idempotency-Key", "webhook-id", "webhook-timestamp"):
        assert len({r.header(name) for r in attempts}) == 1, name
    assert len({r.body for r in attempts}) == 1
    for r in receiver.requests:
        assert verify_webhook(SIGNING_SECRET, r.headers, r.body, tolerance_s=None), r.path
        assert not verify_webhook("whsec_b3RoZXI=", r.headers, r.body, tolerance_s=None)
    assert storage.list_keys("outbox/") == []
    assert worker.jobs_done == 1 and depth(broker.dlq) == 0


@pytest.mark.slow
def test_past_the_window_the_job_goes_to_the_dlq_named_in_the_log(stack, caplog) -> None:
    caplog.set_level(logging.INFO)
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    receiver.set_default(503, path=COMPLETE_PATH)
    worker = _worker(
        stack,
        "trainer.max_epochs=1",
        "reporting.client.max_total_s=1",
        "reporting.client.max_attempts=1",
        outbox_window_s=2,
        outbox_backoff_base_s=0.2,
    )
    worker.dead_letter = lambda body, headers: publish_dead_letter(
        broker, body, headers, str(headers["x-lightning-lora-reason"])
    )
    worker._outbox = None  # rebuilt with the dead-letter hook
    body = _job(stack, 232)
    with running(Consumer(broker, worker.handle, poll_interval=0.2)):
        _guide_publish(broker, body)
        assert wait_for(lambda: worker.jobs_done == 1 and depth(broker.queue) == 0, 240)
    time.sleep(2.2)
    worker.outbox.run_once()
    assert storage.list_keys("outbox/") == []
    dead = get(broker.dlq)
    assert dead is not None and json.loads(dead[1]) == body
    assert "not acknowledged" in dead[0].headers["x-lightning-lora-reason"]
    assert "dead-lettered" in caplog.text and "style 232" in caplog.text


@pytest.mark.slow
def test_a_redelivery_of_an_unacknowledged_completion_resends_it_without_training(stack) -> None:
    receiver, storage = stack["receiver"], stack["storage"]
    receiver.script(COMPLETE_PATH, 503, 503)  # the backend is down at the first delivery
    worker = _worker(
        stack,
        "trainer.max_epochs=1",
        "reporting.client.max_total_s=1",
        "reporting.client.max_attempts=2",
        "reporting.client.backoff_base_s=0.1",
    )
    body = json.dumps(_job(stack, 233)).encode()
    first = worker.handle(_delivery(body, redelivered=False))
    assert first.outcome.name == "ACK" and worker.jobs_done == 1
    assert len(storage.list_keys("outbox/")) == 1
    progress = len(receiver.requests_to(PROGRESS_PATH))
    again = worker.handle(_delivery(body, redelivered=True))  # e.g. the ack was lost
    assert again.outcome.name == "ACK"
    assert worker.jobs_done == 1 and len(receiver.requests_to(PROGRESS_PATH)) == progress
    attempts = [r for r in receiver.requests_to(COMPLETE_PATH) if r.json["style_id"] == 233]
    assert [r.status for r in attempts] == [503, 503, 200]
    assert len({r.header("Idempotency-Key") for r in attempts}) == 1
    assert storage.list_keys("outbox/") == []
    third = worker.handle(_delivery(body, redelivered=True))  # acknowledged now: silent ack
    assert third.outcome.name == "ACK" and len(_accepted(receiver, COMPLETE_PATH, 233)) == 1
