"""The worker's handling of jobs (``TrainingWorker``), end to end, on a real consumer.

Real components only: the RabbitMQ broker on this machine, moto's S3 server over HTTP, a real
local webhook receiver, the tiny model, and (where a crash matters) a ``lightning-lora-worker``
subprocess. Nothing is patched. ``docs/RELIABILITY.md`` maps each fault to the test that proves
the behaviour.

* a job end to end, bad jobs, consecutive jobs starting from a fresh LoRA;
* message text reaching the trainer as literal text; hostile messages; images typed by content;
* S3 unavailable at the download or the upload; the backend failing or down; a job that kills
  its worker (poison); a redelivered job; the broker closing the connection mid-job;
* an error raised while handling an S3 outage (the one fail-or-requeue rule).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.errors import StorageUnavailableError
from lightning_lora.jobs.layout import checkpoint_prefix, model_key, outcome_key
from lightning_lora.worker.app import TrainingWorker, split_config
from lightning_lora.worker.broker import BrokerSettings, publish_job
from lightning_lora.worker.cli import compose_worker_config
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.deliveries import Outcome
from lightning_lora.worker.settings import load_settings
from tests.support.broker import depth, get, running, wait_for
from tests.support.net import closed_port
from tests.support.receiver import Reply, WebhookReceiver
from tests.support.worker_stack import (
    TOKEN,
    _checkpoints,
    _connection_pid,
    _delivery,
    _guide_publish,
    _job,
    _kill,
    _rabbitmqctl,
    _spawn_logged,
    _terminal,
    _wait_terminal,
    _worker,
)

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast


def test_a_job_end_to_end(stack, tiny_model: str, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lightning_lora.worker.app")
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    worker = _worker(stack)
    consumer = Consumer(broker, worker.handle, on_poison=worker.on_poison, poll_interval=0.2)
    with running(consumer):
        publish_job(broker, _job(stack, 11))
        done = _wait_terminal(receiver, 11)
        assert wait_for(lambda: depth(broker.queue) == 0 and worker.jobs_done == 1, 30)
    # the contract: paths, methods, headers, payloads
    assert done.method == "POST" and done.path == COMPLETE_PATH
    assert done.json["model_url"] == f"s3://{storage.bucket}/{model_key(11)}"
    meta = done.json["metadata"]
    assert (meta["training_epochs"], meta["lora_rank"], meta["lora_alpha"]) == (2, 16, 32)
    assert meta["num_images"] == 4  # both 0.png and both 1.png survived the download
    progress = receiver.requests_to(PROGRESS_PATH)
    assert progress and all(r.method == "PATCH" for r in progress)
    assert progress[0].received_at < done.received_at
    assert progress[-1].json["progress"]["progress_percent"] == 100
    for r in [*progress, done]:
        assert r.header("Authorization") == f"Bearer {TOKEN}"
        assert r.header("X-Request-Source") == "training-server"
        assert r.header("Content-Type") == "application/json"
    assert len(_terminal(receiver, 11)) == 1
    phases = re.search(
        r"timings: queue_wait_s=([\d.]+) download_s=([\d.]+) training_s=([\d.]+) "
        r"upload_s=([\d.]+) upload_and_report_s=([\d.]+) total_s=([\d.]+)",
        caplog.text,
    )
    assert phases, caplog.text[-2000:]
    wait, download, training, upload, post, total = map(float, phases.groups())
    assert wait >= 0
    assert download > 0 and training > 0 and upload > 0 and post >= upload
    assert total >= download + training
    assert depth(broker.dlq) == 0 and get(broker.queue) is None
    # the uploaded LoRA loads in diffusers and changes the UNet
    local = storage.download_file(
        model_key(11), tmp_path / "dl" / "pytorch_lora_weights.safetensors"
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(str(local.parent))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    # the run's outcome is recorded once, delivered; its checkpoints were removed after the upload
    (outcome_key,) = [k for k in storage.list_keys(checkpoint_prefix(11)) if "outcome" in k]
    record, _ = storage.get_json(outcome_key)
    assert record["kind"] == "complete" and record["delivered"] is True
    assert record["event_id"] == done.header("Idempotency-Key") == done.header("webhook-id")
    assert _checkpoints(storage, 11) == []
    assert storage.list_keys("outbox/") == []


def test_bad_jobs_fail_cleanly_and_the_worker_carries_on(stack, tmp_path: Path) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    storage.upload_file(_corrupt_png(tmp_path), "styles/bad/corrupt.png")
    worker = _worker(stack)
    consumer = Consumer(broker, worker.handle, on_poison=worker.on_poison, poll_interval=0.2)
    bad = [
        b"this is not json",
        json.dumps({**_job(stack, 21), "num_epochs": -3}).encode(),  # invalid field
        json.dumps(_job(stack, 22, webhook_url="http://evil.example:8000")).encode(),
        json.dumps(
            _job(stack, 23, image_urls=[f"s3://{storage.bucket}/styles/bad/corrupt.png"])
        ).encode(),
        json.dumps(
            _job(stack, 24, image_urls=[f"s3://{storage.bucket}/styles/missing.png"])
        ).encode(),
    ]
    with running(consumer):
        for body in bad:
            publish_job(broker, body)
        publish_job(broker, _job(stack, 25))  # a good job after the bad ones
        ok = _wait_terminal(receiver, 25)
        assert wait_for(lambda: depth(broker.dlq) == 5, 30)
    assert ok.path == COMPLETE_PATH
    codes = {sid: _terminal(receiver, sid) for sid in (21, 22, 23, 24)}
    assert [r.json["error_code"] for r in codes[21]] == ["INVALID_MESSAGE"]
    assert "num_epochs" in codes[21][0].json["error_message"]
    assert codes[22] == []  # nothing is ever sent to a host outside the allowlist
    assert [r.json["error_code"] for r in codes[23]] == ["INVALID_IMAGE"]
    assert "corrupt" in codes[23][0].json["error_message"]
    assert [r.json["error_code"] for r in codes[24]] == ["DOWNLOAD_FAILED"]
    assert "styles/missing.png" in codes[24][0].json["error_message"]
    assert depth(broker.queue) == 0


def _corrupt_png(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "corrupt.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_consecutive_jobs_start_from_a_fresh_lora(stack) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    worker = _worker(stack, "trainer.max_epochs=1")
    consumer = Consumer(broker, worker.handle, poll_interval=0.2)
    with running(consumer):
        publish_job(broker, _job(stack, 31))
        publish_job(broker, _job(stack, 32))
        _wait_terminal(receiver, 32)
        _wait_terminal(receiver, 31)
    files = {}
    for sid in (31, 32):
        path = storage.download_file(model_key(sid), Path(f"/tmp/ll-fresh-{os.getpid()}-{sid}.st"))
        files[sid] = load_file(path)
        path.unlink()
    for k in files[31]:
        torch.testing.assert_close(files[31][k], files[32][k], rtol=0, atol=0)


class CaptionProbe(L.Callback):
    """Records the captions the datamodule hands to the text encoder."""

    def __init__(self) -> None:
        self.captions: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.captions = [item.caption for item in trainer.datamodule.items]


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


class TcpGate:
    """A TCP forwarder to a local port that refuses connections until :meth:`open`.

    While closed nothing listens on :attr:`port`, exactly like a stopped S3 endpoint, and the
    connections it had forwarded are cut (so a client's pooled keep-alive connection dies too).
    """

    def __init__(self, target_port: int) -> None:
        """Reserve a port; forward to ``target_port`` once opened."""
        self.port = closed_port()
        self.target_port = target_port
        self._server: socket.socket | None = None
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()

    def open(self) -> None:
        """Start listening and forwarding."""
        with self._lock:
            if self._server is not None:
                return
            server = socket.create_server(("127.0.0.1", self.port))
            self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def close(self) -> None:
        """Stop listening and cut every forwarded connection."""
        with self._lock:
            server, self._server = self._server, None
            live, self._live = self._live, set()
        if server is not None:
            server.close()
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def outage(self, seconds: float) -> None:
        """Close now and open again after ``seconds`` (in the background)."""
        self.close()
        threading.Timer(seconds, self.open).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _consumer(worker: TrainingWorker, broker: BrokerSettings) -> Consumer:
    return Consumer(broker, worker.handle, on_poison=worker.on_poison, poll_interval=0.2)


def _completions(receiver: WebhookReceiver, style_id: int) -> list[Any]:
    """Completion requests for a style that the receiver accepted (2xx)."""
    return [
        r
        for r in receiver.requests_to(COMPLETE_PATH)
        if (r.json or {}).get("style_id") == style_id and 200 <= r.status < 300
    ]


def _wait_progress(receiver: WebhookReceiver, style_id: int, timeout: float = 240) -> None:
    receiver.wait_for(
        lambda reqs: any(
            r.path == PROGRESS_PATH and (r.json or {}).get("style_id") == style_id for r in reqs
        ),
        timeout,
    )


def _gated_storage(stack: dict, budget_s: float) -> tuple[TcpGate, S3Storage]:
    """The stack's bucket behind a :class:`TcpGate` (open), with an S3 retry budget."""
    good = stack["storage"]
    gate = TcpGate(int(good.endpoint_url.rsplit(":", 1)[1]))
    gate.open()
    storage = S3Storage.from_env(
        bucket=good.bucket,
        endpoint_url=f"http://127.0.0.1:{gate.port}",
        retry_budget_s=budget_s,
        connect_timeout_s=1,
        read_timeout_s=10,
    )
    return gate, storage


def _gated_worker(stack: dict, storage: S3Storage, *extra: str, callbacks=()) -> TrainingWorker:
    worker = _worker(stack, *extra, callbacks=callbacks)
    worker._storage = storage
    return worker


class OutageAtFinalUpload(L.Callback):
    """Closes the gate when training ends (just before the final LoRA upload) for a while."""

    def __init__(self, gate: TcpGate, seconds: float) -> None:
        self.gate, self.seconds, self.trainings = gate, seconds, 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainings += 1
        if self.trainings == 1:
            self.gate.outage(self.seconds)


def test_s3_down_at_download_requeues_and_the_job_completes_once_s3_is_back(stack, caplog) -> None:
    """S3 refusing connections past the retry budget: no failure, the job is requeued, then
    trains once S3 is back; the worker takes the next job."""
    caplog.set_level(logging.INFO)
    receiver, broker = stack["receiver"], stack["broker"]
    gate, storage = _gated_storage(stack, budget_s=1.5)
    worker = _gated_worker(stack, storage, "trainer.max_epochs=1")
    gate.close()
    try:
        with running(_consumer(worker, broker)):
            publish_job(broker, _job(stack, 61))
            assert wait_for(lambda: caplog.text.count("requeued") >= 2, 60), caplog.text[-2000:]
            assert _terminal(receiver, 61) == []  # not the job's fault: nothing reported
            gate.open()  # S3 is back
            done = _wait_terminal(receiver, 61)
            assert done.path == COMPLETE_PATH, done.json
            publish_job(broker, _job(stack, 62))
            assert _wait_terminal(receiver, 62).path == COMPLETE_PATH
            assert wait_for(lambda: depth(broker.queue) == 0 and worker.jobs_done == 2, 30)
    finally:
        gate.close()
    assert "S3 unreachable" in caplog.text
    assert len(_terminal(receiver, 61)) == 1 and len(_terminal(receiver, 62)) == 1
    assert depth(broker.dlq) == 0


@pytest.mark.parametrize("outage_s", [5.0, 20.0])
def test_s3_blip_at_the_final_upload_is_retried_within_the_budget(stack, caplog, outage_s) -> None:
    """S3 refuses connections for 5 s / 20 s when the LoRA is uploaded: retried, one completion."""
    caplog.set_level(logging.INFO)
    receiver, broker, good = stack["receiver"], stack["broker"], stack["storage"]
    gate, storage = _gated_storage(stack, budget_s=60.0)
    outage = OutageAtFinalUpload(gate, outage_s)
    worker = _gated_worker(
        stack,
        storage,
        "trainer.max_epochs=1",
        "reporting.s3_checkpoint.every_n_epochs=0",
        callbacks=[outage],
    )
    style = 63 if outage_s < 10 else 64
    try:
        with running(_consumer(worker, broker)):
            publish_job(broker, _job(stack, style))
            done = _wait_terminal(receiver, style, timeout=240)
            assert wait_for(lambda: depth(broker.queue) == 0 and worker.jobs_done == 1, 30)
    finally:
        gate.close()
    assert done.path == COMPLETE_PATH, done.json
    assert outage.trainings == 1
    assert "S3 upload" in caplog.text and "retrying" in caplog.text  # the blip was met
    assert good.exists(f"models/style_{style}/lora_weights.safetensors")
    assert len(_terminal(receiver, style)) == 1 and depth(broker.dlq) == 0


def test_s3_down_past_the_budget_at_the_upload_requeues_and_keeps_the_lora(stack, caplog) -> None:
    """Past the budget the job is requeued, not failed; the redelivery uploads the LoRA it
    kept, without training again."""
    caplog.set_level(logging.INFO)
    receiver, broker, good = stack["receiver"], stack["broker"], stack["storage"]
    gate, storage = _gated_storage(stack, budget_s=2.0)
    outage = OutageAtFinalUpload(gate, 8.0)
    worker = _gated_worker(
        stack,
        storage,
        "trainer.max_epochs=1",
        "reporting.s3_checkpoint.every_n_epochs=0",
        callbacks=[outage],
    )
    try:
        with running(_consumer(worker, broker)):
            publish_job(broker, _job(stack, 65))
            done = _wait_terminal(receiver, 65, timeout=240)
            assert wait_for(lambda: depth(broker.queue) == 0 and worker.jobs_done == 1, 30)
    finally:
        gate.close()
    assert done.path == COMPLETE_PATH, done.json
    assert "requeued" in caplog.text  # the first delivery gave up on S3 and put the job back
    assert "without training again" in caplog.text
    assert outage.trainings == 1  # trained once, uploaded on the second delivery
    assert good.exists("models/style_65/lora_weights.safetensors")
    assert len(_terminal(receiver, 65)) == 1 and depth(broker.dlq) == 0


def test_completion_is_retried_through_500s_and_delivered_once(stack) -> None:
    """The backend answers 500 twice, then 200: one accepted completion, message acked."""
    receiver, broker = stack["receiver"], stack["broker"]
    receiver.script(COMPLETE_PATH, 500, Reply(503, headers={"Retry-After": "0"}), 200)
    worker = _worker(stack, "trainer.max_epochs=1", "reporting.client.backoff_base_s=0.2")
    with running(_consumer(worker, broker)):
        publish_job(broker, _job(stack, 71))
        receiver.wait_for(lambda reqs: len(_completions(receiver, 71)) >= 1, 240)
        assert wait_for(lambda: depth(broker.queue) == 0 and worker.jobs_done == 1, 30)
        time.sleep(1)  # room for a (wrong) duplicate
    attempts = [r for r in receiver.requests_to(COMPLETE_PATH) if r.json["style_id"] == 71]
    assert [r.status for r in attempts] == [500, 503, 200]
    assert len({json.dumps(r.json, sort_keys=True) for r in attempts}) == 1  # same payload
    assert len(_completions(receiver, 71)) == 1
    assert receiver.requests_to(FAILED_PATH) == []
    assert depth(broker.dlq) == 0


def test_receiver_down_does_not_hold_the_job_and_is_logged(stack, caplog) -> None:
    """Nothing listens at the webhook URL: training runs, the job is acked after the budget."""
    caplog.set_level(logging.INFO)
    broker = stack["broker"]
    budget = 3.0
    worker = _worker(
        stack,
        "trainer.max_epochs=2",
        f"reporting.client.max_total_s={budget}",
        "reporting.client.timeout_s=1",
        "reporting.client.backoff_base_s=0.2",
    )
    dead = f"http://127.0.0.1:{closed_port()}"
    with running(_consumer(worker, broker)):
        publish_job(broker, _job(stack, 72, webhook_url=dead))
        assert wait_for(lambda: worker.jobs_done == 1, 240), caplog.text[-3000:]
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
    assert depth(broker.dlq) == 0  # acked: the LoRA is in S3, only the report was lost
    assert re.search(r"webhook POST /api/webhooks/training/complete .* given up", caplog.text)
    timings = re.search(r"job style-72 timings: .*upload_and_report_s=([0-9.]+)", caplog.text)
    assert timings, caplog.text[-3000:]
    # upload + the completion's retry budget (+ the flush's bookkeeping); never a hang
    assert float(timings.group(1)) < budget + 15


def test_a_backend_that_dribbles_its_answers_holds_no_job_past_its_budget(stack, caplog) -> None:
    """The backend (or a proxy) answers a byte at a time, within every per-read timeout:
    progress never holds training, the completion's first delivery ends within its budget, the
    message is settled, and the outbox delivers the same event once the backend answers."""
    caplog.set_level(logging.INFO)
    receiver, storage = stack["receiver"], stack["storage"]
    dribble = Reply(200, dribble_s=0.05, pad=4000)  # each answer would last minutes
    receiver.set_default(dribble)
    budget = 3.0
    worker = _worker(
        stack,
        "trainer.max_epochs=1",
        f"reporting.client.max_total_s={budget}",
        "reporting.client.timeout_s=1",
        "reporting.client.backoff_base_s=0.2",
        "reporting.webhook.interval_s=0",
    )
    body = json.dumps(_job(stack, 74)).encode()
    settlement = worker.handle(_delivery(body, redelivered=False))
    assert settlement.outcome.name == "ACK"
    timings = re.search(r"job style-74 timings: .*upload_and_report_s=([0-9.]+)", caplog.text)
    assert timings, caplog.text[-3000:]
    assert float(timings.group(1)) < budget + 15  # the dribbled answer would take minutes
    sent = receiver.requests_to(COMPLETE_PATH)
    assert 1 <= len(sent) <= 3 and wait_for(lambda: receiver.cut_short >= len(sent), 10)
    assert len(storage.list_keys("outbox/")) == 1  # kept for the outbox
    receiver.set_default(Reply(200))
    assert wait_for(lambda: worker.outbox.run_once() == 1, 30)
    delivered = receiver.requests_to(COMPLETE_PATH)[-1]
    assert delivered.status == 200 and delivered.header("webhook-id") == sent[0].header(
        "webhook-id"
    )  # the same event
    assert storage.list_keys("outbox/") == []


def test_a_job_that_kills_its_worker_is_dead_lettered_with_a_failure(
    stack, monkeypatch, tmp_path: Path
) -> None:
    """Delivery limit 1: the worker dies (SIGKILL) mid-training; the redelivery is poison."""
    receiver = stack["receiver"]
    broker = stack["broker"].replace(delivery_limit=1)
    monkeypatch.setenv("RABBITMQ_DELIVERY_LIMIT", "1")
    proc = _spawn_logged(stack, tmp_path / "worker.log", "trainer.max_epochs=50")
    try:
        publish_job(broker, _job(stack, 81))
        _wait_progress(receiver, 81)
        proc.send_signal(signal.SIGKILL)  # the "crash": the message was never settled
        proc.wait(30)
    finally:
        _kill(proc)
    worker = _worker(stack, "trainer.max_epochs=1")
    worker.delivery_limit = 1
    with running(_consumer(worker, broker)):
        failed = _wait_terminal(receiver, 81, timeout=60)
        assert wait_for(lambda: depth(broker.dlq) == 1, 30)
    assert failed.path == FAILED_PATH
    assert failed.json["error_code"] == "REDELIVERY_LIMIT"
    assert "delivered 1 times" in failed.json["error_message"]
    assert worker.jobs_done == 0 and len(_terminal(receiver, 81)) == 1
    assert depth(broker.queue) == 0


def test_a_redelivered_completed_job_is_acked_without_training(stack, caplog) -> None:
    """The same message id twice: the second delivery sees the completion marker."""
    caplog.set_level(logging.INFO)
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    worker = _worker(stack, "trainer.max_epochs=1")
    message_id = f"run-{uuid.uuid4().hex[:8]}"
    with running(_consumer(worker, broker)):
        publish_job(broker, _job(stack, 91), message_id=message_id)
        assert _wait_terminal(receiver, 91).path == COMPLETE_PATH
        assert wait_for(lambda: depth(broker.queue) == 0 and worker.jobs_done == 1, 30)
        record, _ = storage.get_json(outcome_key(91, message_id))
        assert record["kind"] == "complete" and record["delivered"] is True
        progress_before = len(receiver.requests_to(PROGRESS_PATH))
        publish_job(broker, _job(stack, 91), message_id=message_id)
        assert wait_for(lambda: "already reported" in caplog.text, 60)
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
        time.sleep(0.5)
    assert worker.jobs_done == 1
    assert len(_terminal(receiver, 91)) == 1
    assert len(receiver.requests_to(PROGRESS_PATH)) == progress_before  # no second training
    assert depth(broker.dlq) == 0


HOSTILE_STYLE = 501

SENTINEL_STYLE = 999


def _hostile(url: str, bucket: str, **fields: Any) -> bytes:
    job = {
        "style_id": HOSTILE_STYLE,
        "image_urls": [f"s3://{bucket}/styles/a.png"],
        "webhook_url": url,
        **fields,
    }
    return json.dumps(job).encode()


#: case -> (body builder (webhook URL, bucket), log fragment, failure webhook expected)
HOSTILE: dict[str, tuple[Callable[[str, str], bytes], str, bool]] = {
    "file-scheme": (
        lambda u, b: _hostile(u, b, image_urls=["file:///etc/passwd"]),
        "image_urls.0': URL must be of the form s3://",
        True,
    ),
    "cloud-metadata-url": (
        lambda u, b: _hostile(u, b, image_urls=["http://169.254.169.254/latest/meta-data"]),
        "image_urls.0': URL must be of the form s3://",
        True,
    ),
    "dotdot-key": (
        lambda u, b: _hostile(u, b, image_urls=[f"s3://{b}/styles/../../secrets/a.png"]),
        "image_urls.0': URL key must not contain",
        True,
    ),
    "thousands-of-urls": (
        lambda u, b: _hostile(u, b, image_urls=[f"s3://{b}/k{i}.png" for i in range(5000)]),
        "too many image URLs (5000 > 100)",
        True,
    ),
    "1mb-body": (
        lambda u, b: _hostile(u, b, style_token="x" * 1_100_000),
        "more than the limit of 1000000",
        True,
    ),
    "900kb-string": (
        lambda u, b: _hostile(u, b, job_id="a" * 900_000),
        "field 'job_id'",
        True,
    ),
    "unknown-field": (
        lambda u, b: _hostile(u, b, shell="rm -rf /"),
        "field 'shell': unknown field",
        True,
    ),
    "wrong-type": (lambda u, b: _hostile(u, b, num_epochs="5"), "field 'num_epochs'", True),
    "negative-number": (lambda u, b: _hostile(u, b, num_epochs=-1), "field 'num_epochs'", True),
    "huge-number": (lambda u, b: _hostile(u, b, seed=10**30), "field 'seed'", True),
    "huge-style-id": (lambda u, b: _hostile(u, b, style_id=2**70), "field 'style_id'", False),
    "style-id-as-string": (lambda u, b: _hostile(u, b, style_id="501"), "field 'style_id'", False),
    "nan-constant": (
        lambda u, b: _hostile(u, b).replace(b'"style_id"', b'"lr": NaN, "style_id"'),
        "field 'lr': not a finite number (nan)",
        True,
    ),
    # what the backend's json.dumps writes for a learning rate computed from bad input
    "python-json-infinity": (
        lambda u, b: _hostile(u, b, learning_rate=float("inf")),
        "field 'learning_rate': not a finite number (inf)",
        True,
    ),
    "repeated-key": (
        lambda u, b: _hostile(u, b).replace(b'"style_id"', b'"seed": 1, "seed": 2, "style_id"'),
        "field 'seed': given more than once",
        True,
    ),
    "json-array": (lambda u, b: b"[" + _hostile(u, b) + b"]", "not a JSON array", False),
    "deep-nesting": (lambda u, b: b"[" * 200_000 + b"]" * 200_000, "not valid JSON", False),
    "not-utf8": (lambda u, b: b"\xff\xfe" + _hostile(u, b), "not UTF-8", False),
    "webhook-to-metadata-host": (
        lambda u, b: _hostile("http://169.254.169.254/latest", b),
        "not in the webhook allowlist",
        False,
    ),
}


@pytest.fixture
def hostile_worker(s3_env: S3Storage, webhook_receiver, broker_settings, monkeypatch):
    """A consuming worker (no training happens: every message fails validation)."""
    train_cfg, section = split_config(compose_worker_config(["model=tiny", "trainer=cpu"]))
    env = {"INTERNAL_API_TOKEN": "tok-hostile-1234", "S3_BUCKET": s3_env.bucket}
    settings = load_settings({**section, "webhook_allowlist": ["127.0.0.1"]}, env)
    worker = TrainingWorker(train_cfg, settings, storage=s3_env)
    with running(_consumer(worker, broker_settings)):
        yield worker, s3_env, webhook_receiver, broker_settings


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_message_is_dead_lettered_named_and_reported(
    case: str, hostile_worker, caplog
) -> None:
    caplog.set_level(logging.INFO)
    worker, storage, receiver, broker = hostile_worker
    build, fragment, reported = HOSTILE[case]
    message_id = f"hostile-{case}"
    publish_job(broker, build(receiver.base_url, storage.bucket), message_id=message_id)
    sentinel = {"style_id": SENTINEL_STYLE, "image_urls": [], "webhook_url": receiver.base_url}
    publish_job(broker, sentinel)  # the worker must still be consuming after the hostile one
    sent = _wait_terminal(receiver, SENTINEL_STYLE, timeout=60)
    assert sent.json["error_code"] == "INVALID_MESSAGE"
    assert wait_for(lambda: depth(broker.dlq) == 2, 30)
    assert depth(broker.queue) == 0 and worker.jobs_done == 0
    lines = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    named = [line for line in lines if fragment in line]
    assert named, lines
    if case != "webhook-to-metadata-host":  # that line names the job id instead
        assert message_id in named[0]
    assert all(len(line) < 3000 for line in lines)  # never echoes a huge value
    hostile = _terminal(receiver, HOSTILE_STYLE)
    if reported:
        assert [r.json["error_code"] for r in hostile] == ["INVALID_MESSAGE"]
        assert len(hostile[0].json["error_message"]) <= 2000
        assert fragment in hostile[0].json["error_message"]  # the backend learns the field
    else:
        assert hostile == []
    assert all("169.254" not in r.path for r in receiver.requests)


def test_broker_closing_the_connection_mid_job_neither_loses_nor_doubles_it(stack, caplog) -> None:
    caplog.set_level(logging.INFO)
    receiver, broker = stack["receiver"], stack["broker"]
    # the completion hangs until released, so the job is surely still running at the close,
    # however fast training is (the client's timeout is above the time the close takes)
    receiver.script(COMPLETE_PATH, Reply(hang=True))
    worker = _worker(stack, "trainer.max_epochs=6", "reporting.client.timeout_s=50")
    consumer = _consumer(worker, broker)
    with running(consumer):
        publish_job(broker, _job(stack, 111))
        _wait_progress(receiver, 111)
        pid = _connection_pid(broker.connection_name)
        assert pid, "the worker's connection is not listed by the broker"
        _rabbitmqctl("close_connection", pid, "reliability test: simulated broker failure")
        receiver.release()
        done = _wait_terminal(receiver, 111)
        assert done.path == COMPLETE_PATH, done.json
        # the unacked message comes back once the worker reconnects: acked via the marker
        assert wait_for(lambda: "already reported" in caplog.text, 90), caplog.text[-3000:]
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
        time.sleep(1)
    assert "connection lost while job" in caplog.text
    assert consumer.connections_made >= 2
    assert worker.jobs_done == 1 and len(_terminal(receiver, 111)) == 1
    assert depth(broker.dlq) == 0


def _image_bytes(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (80, 64), (200, 40, 40)).save(out, format=fmt)
    return out.getvalue()


def test_extensionless_keys_train_and_an_unsupported_file_is_named_by_url(stack) -> None:
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    client = storage.client
    for key, fmt in (
        ("uploads/3f2a9c", "JPEG"),
        ("uploads/77b1e0", "PNG"),
        ("uploads/9c0d", "WEBP"),
    ):
        client.put_object(Bucket=storage.bucket, Key=key, Body=_image_bytes(fmt))
    client.put_object(Bucket=storage.bucket, Key="uploads/anim.gif", Body=_image_bytes("GIF"))
    urls = [f"s3://{storage.bucket}/uploads/{k}" for k in ("3f2a9c", "77b1e0", "9c0d")]
    gif = f"s3://{storage.bucket}/uploads/anim.gif"
    worker = _worker(stack, "trainer.max_epochs=1")
    with running(Consumer(broker, worker.handle, poll_interval=0.2)):
        _guide_publish(broker, _job(stack, 311, image_urls=urls))
        _guide_publish(broker, _job(stack, 312, image_urls=[urls[1], gif]))
        done = _wait_terminal(receiver, 311)
        failed = _wait_terminal(receiver, 312)
    assert done.path == COMPLETE_PATH and done.json["metadata"]["num_images"] == 3
    assert failed.path == FAILED_PATH and failed.json["error_code"] == "INVALID_IMAGE"
    assert gif in failed.json["error_message"]  # the URL the backend knows, no temp path
    assert (
        "/tmp" not in failed.json["error_message"] and "ll-job" not in failed.json["error_message"]
    )


def test_a_corrupt_image_is_reported_by_its_s3_url_not_a_local_path(stack, tmp_path) -> None:
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    good = _image_bytes("PNG")
    storage.client.put_object(Bucket=storage.bucket, Key="up/broken", Body=good[: len(good) // 2])
    url = f"s3://{storage.bucket}/up/broken"
    worker = _worker(stack, "trainer.max_epochs=1")
    with running(Consumer(broker, worker.handle, poll_interval=0.2)):
        _guide_publish(broker, _job(stack, 313, image_urls=[url]))
        failed = _wait_terminal(receiver, 313)
    assert failed.json["error_code"] == "INVALID_IMAGE", failed.json
    assert url in failed.json["error_message"]
    assert "ll-job" not in failed.json["error_message"]


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
