"""Every job reported exactly once, and message text never evaluated (GitHub issue 10).

Real components only: the shared RabbitMQ broker (or a private node of the test's own where the
broker restarts), moto's S3 server over HTTP, a real local webhook receiver, the tiny model, and
``lightning-lora-worker`` subprocesses where two workers share a queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import lightning as L
import pika
import pytest

from lightning_lora.clients.contract import COMPLETE_PATH, PROGRESS_PATH
from lightning_lora.clients.webhook_client import verify_webhook
from lightning_lora.errors import StorageUnavailableError
from lightning_lora.jobs.layout import lease_key, outcome_key
from lightning_lora.jobs.report import error_message_of
from lightning_lora.worker.broker import BrokerSettings, publish_dead_letter
from lightning_lora.worker.consumer import Consumer, Delivery, Outcome
from lightning_lora.worker.records import Holder
from tests.support.broker import depth, get, running, wait_for
from tests.test_worker import TOKEN, _job, _spawn_worker, _stop, _terminal, _wait_terminal, _worker
from tests.test_worker import stack as stack

pytest_plugins = ["tests.support.broker_node"]
pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

SIGNING_SECRET = "whsec_" + "c2lnbmluZy1zZWNyZXQtZm9yLXRlc3Rz"


class CaptionProbe(L.Callback):
    """Records the captions the datamodule hands to the text encoder."""

    def __init__(self) -> None:
        self.captions: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.captions = [item.caption for item in trainer.datamodule.items]


def _accepted(receiver, path: str, style_id: int) -> list:
    return [
        r
        for r in receiver.requests_to(path)
        if (r.json or {}).get("style_id") == style_id and 200 <= r.status < 300
    ]


def _guide_publish(settings: BrokerSettings, body: dict) -> None:
    """Publish exactly as the platform backend's own code does (the service guide)."""
    params = pika.ConnectionParameters(host=settings.host, port=settings.port)
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.queue_declare(queue=settings.queue, durable=True)
        channel.basic_publish(
            exchange="",
            routing_key=settings.queue,
            body=json.dumps(body),
            properties=pika.BasicProperties(delivery_mode=2),
        )
    finally:
        connection.close()


# ------------------------------------------------------------------ 1. literal message text

HOSTILE_CAPTIONS = [
    "${oc.env:INTERNAL_API_TOKEN}",
    "${ll.demo_images:/tmp/ll-evil-%s}",
    "back\\slash 'single' \"double\"\nsecond line",
    "",  # no caption: the template with the (hostile) style token
]


def test_message_text_reaches_the_trainer_as_literal_text(stack, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO)
    hf_token = f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", hf_token)
    receiver, broker = stack["receiver"], stack["broker"]
    evil = Path(HOSTILE_CAPTIONS[1].split(":", 1)[1].rstrip("}") % os.getpid())
    captions = [c.replace("%s", str(os.getpid())) for c in HOSTILE_CAPTIONS]
    token = "${oc.dict.keys:${oc.env:HF_TOKEN}}"
    probe = CaptionProbe()
    worker = _worker(stack, "trainer.max_epochs=1", callbacks=[probe])
    with running(Consumer(broker, worker.handle, poll_interval=0.2)):
        publish = _job(stack, 201, captions=captions, style_token=token)
        _guide_publish(broker, publish)
        done = _wait_terminal(receiver, 201)
    assert done.path == COMPLETE_PATH, done.json
    template = str(worker.train_cfg.data.caption_template)
    expected = [*captions[:3], template.format(token=token)]
    assert sorted(probe.captions) == sorted(expected)  # encoded exactly as sent
    assert not evil.exists()  # no resolver ran
    everything = caplog.text + "".join(r.body.decode() for r in receiver.requests)
    assert hf_token not in everything and TOKEN not in "".join(probe.captions)


def test_failure_messages_never_carry_config_internals() -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    secret = "hunter2-config-secret"
    with pytest.raises(OmegaConfBaseException) as info:
        OmegaConf.create({"a": "${oc.dict.keys:" + secret + "}"}).a  # noqa: B018
    message = error_message_of(info.value)
    assert secret not in message and "oc.dict" not in message and "<class" not in message
    assert message == "the worker's training configuration is invalid (details in the worker log)"
    long = RuntimeError("first line\n" + "x" * 5000)
    assert error_message_of(long) == "RuntimeError: first line"


# ------------------------------------------------------------------ 2. two workers, broker restart


def _two_workers(stack, node, tmp_path: Path, *extra: str) -> tuple[list, BrokerSettings]:
    """Two worker subprocesses on the private node's queue (connection names w1, w2)."""
    broker = stack["broker"].replace(port=node.port, heartbeat=5)
    procs = []
    for name in ("w1", "w2"):
        env = {
            "RABBITMQ_PORT": str(node.port),
            "RABBITMQ_CONNECTION_NAME": f"{broker.queue}-{name}",
        }
        procs.append(
            _spawn_worker(stack, *extra, log_path=tmp_path / f"{name}.log", env=env, broker=broker)
        )
    return procs, broker


def _holder_proc(storage, procs: list, style_id: int) -> subprocess.Popen:
    """The worker process that holds the style's (only) run lease."""
    keys = [k for k in storage.list_keys(f"checkpoints/style_{style_id}/") if "lease" in k]
    assert len(keys) == 1, keys
    record, _ = storage.get_json(keys[0])
    holder = Holder.from_json(record["holder"])
    (proc,) = [p for p in procs if p.pid == holder.pid]
    return proc


def _shutdown(procs: list) -> str:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    return "\n".join(_stop(p) for p in procs)


@pytest.mark.parametrize("fault", ["broker-restart", "forced-close"])
def test_two_workers_and_a_broker_fault_mid_job_report_once(
    stack, private_broker, tmp_path: Path, fault: str
) -> None:
    receiver, storage = stack["receiver"], stack["storage"]
    procs, broker = _two_workers(stack, private_broker, tmp_path, "trainer.max_epochs=30")
    try:
        assert wait_for(
            lambda: sum("worker consuming" in Path(p.log_path).read_text() for p in procs) == 2,
            120,
        ), _shutdown(procs)
        _guide_publish(broker, _job(stack, 211))
        assert receiver.wait_for(lambda reqs: any(r.path == PROGRESS_PATH for r in reqs), 240), (
            _shutdown(procs)
        )
        running_proc = _holder_proc(storage, procs, 211)
        if fault == "broker-restart":
            private_broker.restart(down_s=1.0)
        else:
            name = f"{broker.queue}-w{procs.index(running_proc) + 1}"
            assert private_broker.close_connections(name) == 1
        done = _wait_terminal(receiver, 211, timeout=300)
        assert done.path == COMPLETE_PATH, done.json
        # the redelivered message is settled too (acked without training), the queue drains
        assert wait_for(lambda: _queue_depth(private_broker, broker) == 0, 120)
        time.sleep(2)  # room for a (wrong) second completion
    finally:
        logs = _shutdown(procs)
    assert len(_accepted(receiver, COMPLETE_PATH, 211)) == 1, logs[-4000:]
    assert _terminal(receiver, 211) == [done]
    starts = [
        r
        for r in receiver.requests_to(PROGRESS_PATH)
        if r.json["progress"]["progress_percent"] == 0
    ]
    assert len(starts) == 1, "the job was trained twice"
    assert "already reported" in logs or "is being trained by" in logs


def _queue_depth(node, broker: BrokerSettings) -> int:
    connection = pika.BlockingConnection(node.connection_parameters())
    try:
        return connection.channel().queue_declare(broker.queue, passive=True).method.message_count
    finally:
        connection.close()


def _delivery(body: bytes, *, redelivered: bool) -> Delivery:
    return Delivery(
        body=body,
        properties=pika.BasicProperties(),
        headers={},
        delivery_tag=1,
        redelivered=redelivered,
        delivery_count=0,
        published_at=None,
        stop_requested=threading.Event(),
    )


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


# ------------------------------------------------------------------ 3. republished bodies


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


# ------------------------------------------------------------------ 4. the outbox


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


# ------------------------------------------------------------------ 6. jitter


_JITTER_PROBE = """
import json, lightning as L
from lightning_lora.clients.backoff import backoff_delay
from lightning_lora.worker.broker import BrokerSettings
from lightning_lora.worker.consumer import Consumer, Delivery, Outcome
from lightning_lora.clients.webhook_client import WebhookClient
L.seed_everything(5, verbose=False)
consumer = Consumer(BrokerSettings(), lambda d: None)
client = WebhookClient("http://127.0.0.1:9")
print(json.dumps([consumer._backoff_delay(3), client._backoff_s(3, None), backoff_delay(3, 1, 60)]))
"""


def test_retry_jitter_differs_between_workers_with_the_same_training_seed() -> None:
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _JITTER_PROBE],
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert a != b  # the seeded global random would make them equal


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


# ------------------------------------------------------------------ 7. one disposition rule


class _ErrorWhileHandlingAnOutage(L.Callback):
    """On its first run only: an error raised while handling S3 being down.

    Before the one rule, the runner looked at ``__cause__`` only and reported a failure, the
    job's report walked the chain and sent nothing, and the worker dead-lettered the message as
    ``STORAGE_UNAVAILABLE``: the job ended with no terminal webhook at all.
    """

    def __init__(self) -> None:
        self.raised = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.raised:
            return
        self.raised += 1
        try:
            raise StorageUnavailableError("S3 unreachable for 300s while trying to write")
        except StorageUnavailableError:
            raise KeyError("a bug in the outage handling")  # noqa: B904 (its __context__ is S3)


def test_an_error_while_handling_an_s3_outage_requeues_and_the_redelivery_reports_once(
    stack,
) -> None:
    receiver = stack["receiver"]
    outage = _ErrorWhileHandlingAnOutage()
    worker = _worker(stack, "trainer.max_epochs=1", callbacks=[outage])
    body = json.dumps(_job(stack, 241)).encode()
    first = worker.handle(_delivery(body, redelivered=False))
    assert outage.raised == 1
    assert first.outcome is Outcome.REQUEUE, first  # S3 being down decided: not a failure
    time.sleep(1.0)  # room for a (wrong) failure webhook
    assert _terminal(receiver, 241) == []
    second = worker.handle(_delivery(body, redelivered=True))
    assert second.outcome is Outcome.ACK, second
    done = _wait_terminal(receiver, 241)
    assert done.path == COMPLETE_PATH, done.json
    time.sleep(1.0)
    assert _terminal(receiver, 241) == [done]  # exactly one terminal webhook
