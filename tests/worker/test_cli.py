"""Reliability and security of the queue runner, end to end (GitHub issue 6).

Every test talks to real components: the RabbitMQ broker on this machine, moto's S3 server over
HTTP, a real local webhook receiver, and (where a crash or the process environment matters) a
real ``lightning-lora-worker`` subprocess. Nothing is patched. ``docs/RELIABILITY.md`` maps each
fault to the test that proves the behaviour.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from PIL import Image

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.data.datamodule import StyleDataModule, load_rgb, preprocess
from lightning_lora.errors import InvalidImageError
from lightning_lora.jobs.layout import outcome_key
from lightning_lora.worker.app import TrainingWorker, split_config
from lightning_lora.worker.broker import BrokerSettings, publish_job
from lightning_lora.worker.cli import compose_worker_config
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.settings import load_settings
from tests import test_worker
from tests.support.broker import depth, running, wait_for
from tests.support.receiver import Reply, WebhookReceiver
from tests.test_worker import (
    _job,
    _spawn_worker,
    _terminal,
    _wait_terminal,
    _worker,
)

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

stack = test_worker.stack  # the fixture: bucket with images, receiver, queue, token

# ------------------------------------------------------------------ helpers


def _closed_port() -> int:
    """A local TCP port that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TcpGate:
    """A TCP forwarder to a local port that refuses connections until :meth:`open`.

    While closed nothing listens on :attr:`port`, exactly like a stopped S3 endpoint, and the
    connections it had forwarded are cut (so a client's pooled keep-alive connection dies too).
    """

    def __init__(self, target_port: int) -> None:
        """Reserve a port; forward to ``target_port`` once opened."""
        self.port = _closed_port()
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


def _rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


def _connection_pid(connection_name: str) -> str | None:
    """The broker's pid of the connection whose ``connection_name`` client property matches."""
    out = _rabbitmqctl("list_connections", "-q", "--no-table-headers", "pid", "client_properties")
    needle = f'{{"connection_name","{connection_name}"}}'
    for line in out.splitlines():
        if needle in line:
            return line.split("\t", 1)[0]
    return None


def _spawn_logged(stack: dict, log_path: Path, *extra: str) -> subprocess.Popen:
    """A worker subprocess whose output goes to ``log_path``."""
    return _spawn_worker(stack, *extra, log_path=log_path)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


def _wait_progress(receiver: WebhookReceiver, style_id: int, timeout: float = 240) -> None:
    receiver.wait_for(
        lambda reqs: any(
            r.path == PROGRESS_PATH and (r.json or {}).get("style_id") == style_id for r in reqs
        ),
        timeout,
    )


# ------------------------------------------------------------------ a. S3 unavailable


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


# ------------------------------------------------------------------ b. webhook receiver faults


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
    dead = f"http://127.0.0.1:{_closed_port()}"
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


# ------------------------------------------------------------------ c. poison message


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


# ------------------------------------------------------------------ d. idempotent completion


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


# ------------------------------------------------------------------ e. hostile messages

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
        "invalid JSON constant NaN",
        False,
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
    else:
        assert hostile == []
    assert all("169.254" not in r.path for r in receiver.requests)


# ------------------------------------------------------------------ e. hostile images


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 200
    started = time.monotonic()
    with pytest.raises(InvalidImageError, match=r"bomb\.png.*(30000x30000|decompression bomb)"):
        load_rgb(bomb)  # the default limit (64 Mpx), no override
    assert time.monotonic() - started < 2


def test_tiny_and_extreme_aspect_images_train_at_the_target_resolution(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (10, 200, 10)).save(tmp_path / "dot.png")
    Image.new("RGB", (20000, 100), (200, 10, 10)).save(tmp_path / "strip.png")
    for name in ("dot.png", "strip.png"):
        assert preprocess(load_rgb(tmp_path / name), 64).shape == (3, 64, 64)
    dm = StyleDataModule(str(tmp_path), resolution=64, batch_size=2, cache_latents=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 64, 64)


def test_animated_png_uses_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), (i * 100, 0, 0)) for i in range(3)]
    path = tmp_path / "anim.png"
    frames[0].save(path, format="PNG", save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 3  # a real APNG
    assert load_rgb(path).getpixel((8, 8)) == (0, 0, 0)


# ------------------------------------------------------------------ f. secrets


@pytest.fixture
def secret_rabbit_user() -> Iterator[tuple[str, str]]:
    """A broker user with a distinctive password (deleted afterwards)."""
    user = f"ll-secret-{uuid.uuid4().hex[:6]}"
    password = f"rmq-pw-{uuid.uuid4().hex}"
    _rabbitmqctl("add_user", user, password)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        _rabbitmqctl("delete_user", user)


def test_secrets_never_reach_logs_or_webhooks(
    stack, secret_rabbit_user, monkeypatch, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    user, rmq_password = secret_rabbit_user
    secrets = {
        "INTERNAL_API_TOKEN": f"tok-{uuid.uuid4().hex}",
        "AWS_SECRET_ACCESS_KEY": f"aws-{uuid.uuid4().hex}",
        "RABBITMQ_PASSWORD": rmq_password,
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RABBITMQ_USER", user)
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")  # the most verbose the worker gets
    log_path = tmp_path / "worker.log"
    proc = _spawn_logged(stack, log_path, "trainer.max_epochs=1")
    try:
        publish_job(broker, _job(stack, 101))
        bad_url = f"s3://{storage.bucket}/styles/missing.png"
        publish_job(broker, _job(stack, 102, image_urls=[bad_url]))  # a failure path too
        assert _wait_terminal(receiver, 101).path == COMPLETE_PATH
        assert _wait_terminal(receiver, 102).json["error_code"] == "DOWNLOAD_FAILED"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        _kill(proc)
    time.sleep(0.5)  # the drain thread writes the last lines
    output = log_path.read_text(encoding="utf-8")
    assert "worker consuming" in output and "settled: ACK" in output  # really captured
    assert f"{user}@" in output  # the broker was reached as the secret user
    webhooks = [r.body.decode("utf-8", "replace") for r in receiver.requests]
    other_headers = [
        f"{k}: {v}"
        for r in receiver.requests
        for k, v in r.headers.items()
        if k.lower() != "authorization"
    ]
    for name, value in secrets.items():
        assert value not in output, f"{name} leaked into the worker's output"
        assert value not in caplog.text, f"{name} leaked into the test process's logs"
        assert not any(value in body for body in webhooks), f"{name} leaked into a webhook"
        assert not any(value in h for h in other_headers), f"{name} leaked into a header"
    auth = {r.header("Authorization") for r in receiver.requests}
    assert auth == {f"Bearer {secrets['INTERNAL_API_TOKEN']}"}  # used, only where it belongs


# ------------------------------------------------------------------ g. connection loss mid-job


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
