"""Cancelling a style's job (``lightning_lora.worker.cancels``), on real components.

The broker on this machine (a private node where it restarts), moto's S3 server over HTTP, a
local webhook receiver and the tiny model:

* the cancel record's window: which runs a cancel stops (a fake clock, two ledgers);
* a cancel message's fields are data, named when wrong; a bad one is dead-lettered;
* ``lightning-lora-enqueue --cancel`` sends the backend's message;
* a running job stops within seconds, reports ``CANCELLED`` once, drops its checkpoints, and
  the worker goes on to the next job;
* a job cancelled while queued is never trained; the same body published again trains;
* a cancel after the completion, or for a style with no job, changes nothing;
* two worker processes, a cancel racing the job and a broker restart: one ``CANCELLED``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.errors import InvalidMessageError, JobCancelledError, disposition_of
from lightning_lora.jobs.layout import cancel_key, model_key
from lightning_lora.worker.broker import BrokerSettings, publish_cancel, publish_job
from lightning_lora.worker.cancels import BARRIER_HEADER, barrier_of, parse_cancel
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.deliveries import ControlReply, Delivery, Outcome
from lightning_lora.worker.ledger import Ledger
from lightning_lora.worker.records import CancelRecord
from tests.support.broker import depth, get, running, wait_for
from tests.support.clock import FakeClock
from tests.support.worker_stack import (
    _accepted,
    _checkpoints,
    _guide_cancel,
    _guide_publish,
    _job,
    _shutdown_all,
    _terminal,
    _two_workers,
    _wait_terminal,
    _worker,
)

pytest_plugins = ["tests.support.broker_node"]

LONG = "trainer.max_epochs=400"  # minutes of training on the tiny model: a cancel comes first
MARGIN_S = 1.0  # worker.cancel_margin_s of the in-process workers (10 s by default)


def _consumer(worker, broker: BrokerSettings) -> Consumer:
    return Consumer(
        broker,
        worker.handle,
        on_poison=worker.on_poison,
        on_control=worker.on_control,
        poll_interval=0.2,
    )


def _cancel_record(storage: S3Storage, style_id: int) -> CancelRecord | None:
    found = storage.get_json(cancel_key(style_id))
    return None if found is None else CancelRecord.from_json(found[0])


def _closed(storage: S3Storage, style_id: int) -> bool:
    record = _cancel_record(storage, style_id)
    return record is not None and record.closed_at is not None


def _started(receiver, style_id: int) -> int:
    """How many times the style's job started training (its 0 % progress webhooks)."""
    return sum(
        1
        for r in receiver.requests_to(PROGRESS_PATH)
        if (r.json or {}).get("style_id") == style_id
        and r.json["progress"]["progress_percent"] == 0
    )


# --------------------------------------------------------------------------- the record
def test_a_cancel_stops_the_runs_that_began_before_its_barrier(s3_env: S3Storage) -> None:
    clock = FakeClock()
    a, b = Ledger(s3_env, 60.0, clock, 0.5), Ledger(s3_env, 60.0, clock, 0.5)
    running_run = a.resolve_run(5, "sha-running", new_publication=True)
    other_style = a.resolve_run(6, "sha-other", new_publication=True)
    clock.advance(1)
    cancel = b.open_cancel(5)
    clock.advance(1)
    queued_run = a.resolve_run(5, "sha-queued", new_publication=True)  # taken while open
    assert a.cancel_stopping(running_run) == cancel
    assert a.cancel_stopping(queued_run) == cancel
    assert a.cancel_stopping(other_style) is None
    clock.advance(1)
    assert b.close_cancel(5, cancel.cancel_id) is True  # the barrier came out
    assert a.close_cancel(5, cancel.cancel_id) is False  # once
    clock.advance(0.25)  # a job taken at the barrier's moment, recorded just after it closed
    at_the_barrier = a.resolve_run(5, "sha-racing", new_publication=True)
    assert a.cancel_stopping(at_the_barrier) == replace(cancel, closed_at=clock.now - 0.25)
    clock.advance(1)
    retrain = a.resolve_run(5, "sha-queued", new_publication=True)  # the same body, published again
    assert retrain.generation == 2 and retrain.started_at > queued_run.started_at
    assert a.cancel_stopping(retrain) is None  # published after the cancel: it trains
    # a redelivery of the old run still belongs to the cancel (it began before the barrier)
    assert a.cancel_stopping(queued_run) is not None
    # a newer cancel replaces the old one: the old barrier no longer closes it
    newer = b.open_cancel(5)
    assert a.close_cancel(5, cancel.cancel_id) is False
    assert a.cancel_stopping(retrain) == newer
    assert a.close_cancel(5, newer.cancel_id) is True


def test_a_cancel_message_is_data_and_a_bad_one_is_named() -> None:
    assert parse_cancel(b'{"style_id": 42}') == 42
    assert parse_cancel(b'{"style_id": 42, "reason": "${oc.env:HOME}"}') == 42  # ignored, inert
    for body, named in [
        (b'{"style_id": "42"}', "field 'style_id'"),
        (b'{"style_id": 0}', "field 'style_id'"),
        (b'{"style_id": true}', "field 'style_id'"),
        (b"{}", "field 'style_id'"),
        (b"[42]", "JSON object"),
        (b"\xff", "not JSON"),
        (b"x" * 5000, "at most 4096"),
    ]:
        with pytest.raises(InvalidMessageError, match=named):
            parse_cancel(body)
    assert barrier_of({}, b'{"style_id": 42}') is None  # a job is not a barrier
    assert barrier_of({BARRIER_HEADER: b"abc"}, b'{"style_id": 42}') == (42, "abc")
    cancelled = disposition_of(JobCancelledError("stop"))
    assert (cancelled.requeue, cancelled.error_code, cancelled.dead_letter) == (
        False,
        "CANCELLED",
        False,
    )
    assert disposition_of(ValueError("x")).dead_letter is True


def test_enqueue_cancel_sends_the_backends_message(broker_settings: BrokerSettings) -> None:
    env = {"RABBITMQ_HOST": broker_settings.host, "PATH": str(Path(sys.executable).parent)}
    script = str(Path(sys.executable).parent / "lightning-lora-enqueue")
    args = [script, "--queue", broker_settings.queue]
    done = subprocess.run(
        [*args, "--cancel", "42"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    found = get(broker_settings.cancels)
    assert found is not None
    properties, body = found
    assert json.loads(body) == {"style_id": 42} and properties.delivery_mode == 2
    assert properties.message_id == done.stdout.strip()
    bad = subprocess.run(
        [*args, "--cancel", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "style_id" in bad.stderr
    assert depth(broker_settings.cancels) == 0


def test_waiting_cancels_are_handled_before_the_first_job_is_taken(
    broker_settings: BrokerSettings,
) -> None:
    """At connect the control queue is emptied (each handled to the end) before any job."""
    events: list[str] = []

    def on_control(delivery: Delivery) -> ControlReply:
        events.append("cancel start")
        time.sleep(0.5)  # a slow store: the job must still wait for it
        events.append("cancel end")
        return ControlReply()

    def on_job(delivery: Delivery) -> Outcome:
        events.append("job")
        return Outcome.ACK

    publish_job(broker_settings, b'{"style_id": 1}')
    publish_cancel(broker_settings, 1)
    publish_cancel(broker_settings, 2)
    consumer = Consumer(broker_settings, on_job, on_control=on_control, poll_interval=0.1)
    with running(consumer):
        assert wait_for(lambda: "job" in events, 30)
    assert events == ["cancel start", "cancel end", "cancel start", "cancel end", "job"]
    assert depth(broker_settings.cancels) == 0 and depth(broker_settings.queue) == 0


def test_a_failing_control_handler_holds_no_job_back(broker_settings: BrokerSettings) -> None:
    """A cancel the worker cannot handle now (the store down) stays queued; jobs go on."""
    tries: list[str] = []
    jobs: list[bytes] = []

    def on_control(delivery: Delivery) -> ControlReply:
        tries.append("cancel")
        raise RuntimeError("the store is down")

    def on_job(delivery: Delivery) -> Outcome:
        jobs.append(delivery.body)
        return Outcome.ACK

    publish_cancel(broker_settings, 1)
    publish_job(broker_settings, b'{"style_id": 2}')
    consumer = Consumer(broker_settings, on_job, on_control=on_control, poll_interval=0.1)
    with running(consumer):
        assert wait_for(lambda: jobs == [b'{"style_id": 2}'] and len(tries) >= 2, 30)
    assert depth(broker_settings.cancels) == 1  # kept, not lost, not dead-lettered
    assert depth(broker_settings.dlq) == 0


# --------------------------------------------------------------------------- through the worker
class _Held(L.Callback):
    """Weak references to a job's trainer, module and optimizer: are they freed after it?"""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.refs = [weakref.ref(x) for x in (trainer, pl_module, trainer.optimizers[0])]


@pytest.mark.slow
def test_a_running_job_stops_reports_cancelled_once_and_the_worker_goes_on(stack) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    held = _Held()
    worker = _worker(stack, LONG, callbacks=[held], cancel_poll_s=0.5)
    with running(_consumer(worker, broker)):
        _guide_publish(broker, _job(stack, 301))
        assert wait_for(lambda: _checkpoints(storage, 301) != [], 240), "no checkpoint yet"
        steps_before = max(
            r.json["progress"]["current_epoch"]
            for r in receiver.requests_to(PROGRESS_PATH)
            if r.json["style_id"] == 301
        )
        sent = time.monotonic()
        _guide_cancel(broker, 301)
        done = _wait_terminal(receiver, 301, timeout=120)
        took = time.monotonic() - sent
        assert wait_for(lambda: depth(broker.queue) == 0 and _closed(storage, 301), 60)
        # the stopped job's trainer, module and optimizer (its Adam moments) are freed
        assert len(held.refs) == 3 and [ref() for ref in held.refs] == [None, None, None]
        # the worker carries on: the next job trains and completes
        publish_job(broker, _job(stack, 302, num_epochs=1))
        assert _wait_terminal(receiver, 302).path == COMPLETE_PATH
    assert done.path == FAILED_PATH and done.json["error_code"] == "CANCELLED", done.json
    assert "cancelled" in done.json["error_message"]
    assert len(_terminal(receiver, 301)) == 1  # one terminal webhook, the cancel
    assert took < 60, took  # seconds, not the minutes the job had left
    assert steps_before < 400
    assert _checkpoints(storage, 301) == []  # dropped
    assert storage.list_keys("models/style_301/") == []  # no model uploaded
    assert depth(broker.dlq) == 0 and depth(broker.cancels) == 0
    assert storage.list_keys("outbox/") == []


@pytest.mark.slow
def test_a_job_cancelled_while_queued_never_trains_and_a_retrain_does(stack) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    job = _job(stack, 311, num_epochs=1)
    _guide_publish(broker, job)  # the backend publishes, then withdraws it: no worker runs yet
    _guide_cancel(broker, 311)
    worker = _worker(stack, cancel_margin_s=MARGIN_S)
    with running(_consumer(worker, broker)):
        done = _wait_terminal(receiver, 311, timeout=120)
        assert wait_for(lambda: depth(broker.queue) == 0 and _closed(storage, 311), 60)
        assert done.path == FAILED_PATH and done.json["error_code"] == "CANCELLED"
        assert _started(receiver, 311) == 0  # never trained
        time.sleep(MARGIN_S + 0.5)  # past the cancel's margin (store clock, same process)
        _guide_publish(broker, job)  # the same body again: a retrain, after the cancel
        assert receiver.wait_for(lambda reqs: len(_terminal(receiver, 311)) == 2, 240)
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
    first, second = _terminal(receiver, 311)
    assert first == done and second.path == COMPLETE_PATH
    assert _started(receiver, 311) == 1
    assert depth(broker.dlq) == 0 and depth(broker.cancels) == 0


@pytest.mark.slow
def test_a_cancel_after_the_completion_or_without_a_job_changes_nothing(stack) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    worker = _worker(stack, "trainer.max_epochs=1", cancel_margin_s=MARGIN_S)
    with running(_consumer(worker, broker)):
        _guide_publish(broker, _job(stack, 321))
        assert _wait_terminal(receiver, 321).path == COMPLETE_PATH
        assert wait_for(lambda: depth(broker.queue) == 0 and worker.jobs_done == 1, 30)
        _guide_cancel(broker, 321)  # after the completion
        _guide_cancel(broker, 322)  # a style with no job
        _guide_cancel(broker, 322)  # twice
        assert wait_for(lambda: _closed(storage, 321) and _closed(storage, 322), 60)
        assert wait_for(lambda: depth(broker.queue) == 0 and depth(broker.cancels) == 0, 30)
        time.sleep(MARGIN_S + 0.5)  # past the cancel's margin
        _guide_publish(broker, _job(stack, 322))  # a job after the cancel trains
        assert _wait_terminal(receiver, 322).path == COMPLETE_PATH
    assert len(_terminal(receiver, 321)) == 1 and len(_accepted(receiver, COMPLETE_PATH, 321)) == 1
    assert len(_terminal(receiver, 322)) == 1
    assert model_key(321) in storage.list_keys("models/style_321/")  # the finished model stays
    assert depth(broker.dlq) == 0


@pytest.mark.slow
def test_a_bad_cancel_is_dead_lettered_named_and_the_worker_goes_on(stack) -> None:
    receiver, broker = stack["receiver"], stack["broker"]
    worker = _worker(stack, "trainer.max_epochs=1")
    with running(_consumer(worker, broker)):
        from tests.support.broker import channel

        with channel() as ch:
            ch.basic_publish("", broker.cancels, b'{"style_id": "all"}')
        assert wait_for(lambda: depth(broker.dlq) == 1, 30)
        _guide_publish(broker, _job(stack, 331))
        assert _wait_terminal(receiver, 331).path == COMPLETE_PATH
    properties, _body = get(broker.dlq)
    assert "field 'style_id'" in properties.headers["x-lightning-lora-reason"]
    assert _terminal(receiver, 331)[0].path == COMPLETE_PATH


@pytest.mark.slow
def test_two_workers_a_racing_cancel_and_a_broker_restart_report_one_cancel(
    stack, private_broker, tmp_path: Path
) -> None:
    receiver, storage = stack["receiver"], stack["storage"]
    procs, broker = _two_workers(stack, private_broker, tmp_path, LONG, "worker.cancel_poll_s=0.5")
    try:
        assert wait_for(
            lambda: sum("worker consuming" in Path(p.log_path).read_text() for p in procs) == 2,
            120,
        ), _shutdown_all(procs)
        _guide_publish(broker, _job(stack, 341))
        _guide_cancel(broker, 341)  # at once: the cancel races the job
        private_broker.restart(down_s=1.0)  # and the broker goes away meanwhile
        done = _wait_terminal(receiver, 341, timeout=300)
        assert wait_for(lambda: _closed(storage, 341), 120), _shutdown_all(procs)[-4000:]
        time.sleep(2)  # room for a (wrong) second terminal webhook
        assert all(p.poll() is None for p in procs)  # both workers still run
    finally:
        logs = _shutdown_all(procs)
    assert done.path == FAILED_PATH and done.json["error_code"] == "CANCELLED", logs[-4000:]
    assert _terminal(receiver, 341) == [done]
    assert _started(receiver, 341) <= 1
    assert _checkpoints(storage, 341) == []
