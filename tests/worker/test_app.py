"""The queue runner end to end: the real broker, moto's S3 over HTTP, a real webhook receiver,
the tiny model."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.jobs.layout import checkpoint_prefix, model_key
from lightning_lora.worker.app import TrainingWorker, split_config
from lightning_lora.worker.broker import BrokerSettings, publish_job
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.settings import load_settings
from tests.conftest import TINY_OVERRIDES, composed
from tests.support.broker import depth, get, running, wait_for

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast

TOKEN = "tok-worker-secret-1234"
WORKER_SCRIPT = Path(sys.executable).parent / "lightning-lora-worker"


def _train_overrides(*extra: str) -> list[str]:
    return [
        "callbacks=production",
        *TINY_OVERRIDES,
        "trainer.max_epochs=2",
        "reporting.webhook.interval_s=0.2",
        "reporting.s3_checkpoint.every_n_epochs=1",
        "reporting.client.max_total_s=20",
        *extra,
    ]


@pytest.fixture
def stack(
    s3_env: S3Storage, webhook_receiver, broker_settings, monkeypatch, demo_images, tiny_model
):
    """Everything a job touches: bucket with images, receiver, queue, token."""
    monkeypatch.setenv("INTERNAL_API_TOKEN", TOKEN)
    pngs = sorted(demo_images.glob("*.png"))[:4]
    urls = []
    for i, png in enumerate(pngs):  # two files called 1.png in different prefixes
        key = f"styles/src/{'a' if i % 2 else 'b'}/{i // 2}.png"
        s3_env.upload_file(png, key)
        urls.append(f"s3://{s3_env.bucket}/{key}")
    return {
        "storage": s3_env,
        "receiver": webhook_receiver,
        "broker": broker_settings,
        "urls": urls,
    }


def _job(stack, style_id: int, **extra) -> dict:
    return {
        "style_id": style_id,
        "image_urls": stack["urls"],
        "webhook_url": stack["receiver"].base_url,
        "seed": 5,
        **extra,
    }


def _worker(stack, *extra: str, callbacks=(), **settings) -> TrainingWorker:
    """An in-process worker on the stack's bucket, with the tiny model and short leases."""
    train_cfg, section = split_config(composed(*_train_overrides(*extra), config_name="worker"))
    values = {**section, "webhook_allowlist": ["127.0.0.1"], "lease_ttl_s": 5, **settings}
    env = {"INTERNAL_API_TOKEN": TOKEN, "S3_BUCKET": stack["storage"].bucket}
    return TrainingWorker(
        train_cfg, load_settings(values, env), storage=stack["storage"], callbacks=callbacks
    )


def _checkpoints(storage: S3Storage, style_id: int) -> list[str]:
    return [k for k in storage.list_keys(checkpoint_prefix(style_id)) if k.endswith(".ckpt")]


def _terminal(receiver, style_id: int) -> list:
    return [
        r
        for r in receiver.requests
        if r.path in (COMPLETE_PATH, FAILED_PATH) and r.json and r.json.get("style_id") == style_id
    ]


def _wait_terminal(receiver, style_id: int, timeout: float = 240) -> object:
    receiver.wait_for(
        lambda reqs: any(
            r.path in (COMPLETE_PATH, FAILED_PATH) and (r.json or {}).get("style_id") == style_id
            for r in reqs
        ),
        timeout,
    )
    return _terminal(receiver, style_id)[0]


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


# ------------------------------------------------------------------ worker processes
def _spawn_worker(
    stack,
    *extra: str,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    broker: BrokerSettings | None = None,
) -> subprocess.Popen:
    """A ``lightning-lora-worker`` process; its output goes to a file (read by ``_stop``)."""
    broker = broker or stack["broker"]
    env = {
        **os.environ,
        "RABBITMQ_HOST": broker.host,
        "RABBITMQ_PORT": str(broker.port),
        "RABBITMQ_QUEUE": broker.queue,
        "RABBITMQ_HEARTBEAT": "5",
        "PYTHONUNBUFFERED": "1",
        "S3_RETRY_BUDGET_S": "20",
        **(env or {}),
    }
    args = [
        str(WORKER_SCRIPT),
        *_train_overrides(*extra),
        "worker.webhook_allowlist=[127.0.0.1]",
        "worker.grace_period_s=60",
        "worker.lease_ttl_s=6",
        "worker.outbox_poll_s=1",
        "worker.outbox_backoff_base_s=0.5",
    ]
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="ll-worker-", suffix=".log")[1])
    with open(log_path, "a", encoding="utf-8") as log:  # a file: a full pipe could block a worker
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    return proc


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    return Path(proc.log_path).read_text(encoding="utf-8", errors="replace")


def test_a_killed_worker_s_job_resumes_from_its_s3_checkpoint(stack) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    extra = ("trainer.max_epochs=6",)
    first = _spawn_worker(stack, *extra)
    second = None
    try:
        publish_job(broker, _job(stack, 41))
        assert wait_for(lambda: len(_checkpoints(storage, 41)) >= 1, 240, interval=0.2), _stop(
            first
        )
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        killed_at = time.monotonic()
        assert not _terminal(receiver, 41)
        second = _spawn_worker(stack, *extra)
        done = _wait_terminal(receiver, 41)
        assert done.path == COMPLETE_PATH, done.json
        assert done.json["metadata"]["training_epochs"] == 6
        assert done.json["metadata"].get("resumed_from_epoch", 0) >= 1
        after = [r for r in receiver.requests_to(PROGRESS_PATH) if r.received_at > killed_at]
        assert after and after[0].json["progress"]["current_epoch"] >= 1
        time.sleep(1)
        assert len(_terminal(receiver, 41)) == 1
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
    finally:
        _stop(first)
        if second is not None:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(60)
            finally:
                _stop(second)


def test_sigterm_checkpoints_requeues_and_exits_zero(stack) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    proc = _spawn_worker(
        stack, "trainer.max_epochs=50", "reporting.s3_checkpoint.every_n_epochs=100"
    )
    try:
        publish_job(broker, _job(stack, 51))
        assert receiver.wait_for(
            lambda reqs: any(
                r.path == PROGRESS_PATH and r.json["progress"]["current_epoch"] >= 1 for r in reqs
            ),
            240,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        out = _stop(proc)
    assert _checkpoints(storage, 51), out[-3000:]  # checkpointed on the way out
    assert _terminal(receiver, 51) == []  # neither completed nor failed
    assert depth(broker.queue) == 1  # back in the queue for the next worker
    assert TOKEN not in out
