"""The outbox (``lightning_lora.worker.outbox``), through the worker."""

from __future__ import annotations

import json
import logging
import time

import pytest

from lightning_lora.clients.contract import COMPLETE_PATH, PROGRESS_PATH
from lightning_lora.clients.webhook_client import verify_webhook
from lightning_lora.worker.broker import publish_dead_letter
from lightning_lora.worker.consumer import Consumer
from tests.support.broker import depth, get, running, wait_for
from tests.support.worker_stack import _accepted, _delivery, _guide_publish, _job, _worker

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
