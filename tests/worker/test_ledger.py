"""The run ledger in the job bucket (``lightning_lora.worker.ledger``), through the worker."""

from __future__ import annotations

import json
import logging
import time

import pytest

from lightning_lora.clients.contract import COMPLETE_PATH
from lightning_lora.jobs.layout import lease_key, outcome_key
from lightning_lora.worker.consumer import Consumer
from tests.support.broker import depth, running, wait_for
from tests.support.worker_stack import (
    _accepted,
    _delivery,
    _guide_publish,
    _job,
    _wait_terminal,
    _worker,
)


@pytest.mark.slow
def test_a_foreign_lease_is_waited_for_then_taken_over_when_it_expires(stack, caplog) -> None:
    """A run leased by a worker on another host: a redelivery waits while the lease lives and
    takes the run over once it expires (that worker died), resuming and reporting it."""
    caplog.set_level(logging.INFO)
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    worker = _worker(stack, "trainer.max_epochs=1")
    body = _job(stack, 212)
    with running(Consumer(broker, worker.handle, poll_interval=0.2)):
        _guide_publish(broker, body)
        assert _wait_terminal(receiver, 212).path == COMPLETE_PATH
    # the same body again, but redelivered while "another host" still holds the run's lease
    run = worker.ledger.resolve_run(212, _key(body), new_publication=False)
    record, _etag = storage.get_json(outcome_key(212, run.run_id))
    other = {
        "run_id": run.run_id,
        "holder": {"worker_id": "elsewhere:1:x", "host": "elsewhere", "pid": 1, "create_time": 1},
        "attempts": 1,
        "expires_at": time.time() + 3,
        "released": False,
    }
    storage.delete_key(outcome_key(212, run.run_id))
    storage.put_json(lease_key(212, run.run_id), other)
    started = time.monotonic()
    settlement = worker.handle(_delivery(json.dumps(body).encode(), redelivered=True))
    waited = time.monotonic() - started
    assert "is being trained by elsewhere:1:x" in caplog.text
    assert waited >= 2.5  # it waited for the foreign lease to expire, then took over
    assert settlement.outcome.name == "ACK"
    assert len(_accepted(receiver, COMPLETE_PATH, 212)) == 2  # the expired run was finished
    assert record["kind"] == "complete"


def _key(body: dict) -> str:
    from lightning_lora.jobs.layout import job_key_for

    return job_key_for(None, json.dumps(body).encode())


@pytest.mark.slow
def test_the_same_body_published_again_is_a_new_job(stack) -> None:
    receiver, broker = stack["receiver"], stack["broker"]
    worker = _worker(stack, "trainer.max_epochs=1")
    body = _job(stack, 221)
    with running(Consumer(broker, worker.handle, poll_interval=0.2)):
        _guide_publish(broker, body)
        receiver.wait_for(lambda reqs: len(_accepted(receiver, COMPLETE_PATH, 221)) == 1, 240)
        _guide_publish(broker, body)  # the backend retrains the style: same JSON, no message_id
        receiver.wait_for(lambda reqs: len(_accepted(receiver, COMPLETE_PATH, 221)) == 2, 240)
        assert wait_for(lambda: depth(broker.queue) == 0 and worker.jobs_done == 2, 30)
    first, second = _accepted(receiver, COMPLETE_PATH, 221)
    assert first.header("Idempotency-Key") != second.header("Idempotency-Key")
    assert first.header("webhook-id") == first.header("Idempotency-Key")
