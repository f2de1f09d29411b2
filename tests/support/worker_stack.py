"""The worker tests' stack and helpers (``tests/worker``; its ``conftest.py`` exposes ``stack``).

``stack``: a fresh bucket on moto's S3 server holding four demo images (two called ``1.png`` under
different prefixes), a webhook receiver, a queue on the real broker and the worker's token.
Workers run in this process (:func:`_worker`) or as ``lightning-lora-worker`` subprocesses
(:func:`_spawn_worker`, their output in a log file); the helpers read what a job sent the
receiver, publish as the platform backend does, and build deliveries by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pika
import pytest

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.jobs.layout import checkpoint_prefix
from lightning_lora.worker.app import TrainingWorker, split_config
from lightning_lora.worker.broker import BrokerSettings
from lightning_lora.worker.deliveries import Delivery
from lightning_lora.worker.settings import load_settings
from tests.conftest import TINY_OVERRIDES, composed
from tests.support.broker import channel

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


def _shutdown_all(procs: list) -> str:
    """SIGTERM every worker process, wait for each, and return their logs together."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    return "\n".join(_stop(p) for p in procs)


def _accepted(receiver, path: str, style_id: int) -> list:
    return [
        r
        for r in receiver.requests_to(path)
        if (r.json or {}).get("style_id") == style_id and 200 <= r.status < 300
    ]


def _guide_publish(settings: BrokerSettings, body: dict) -> None:
    """Publish exactly as the platform backend's own code does (the service guide)."""
    _guide_send(settings, settings.queue, body)


def _guide_cancel(settings: BrokerSettings, style_id: int) -> None:
    """Cancel a style's job as the README's backend snippet does (the cancel queue)."""
    _guide_send(settings, settings.cancels, {"style_id": style_id})


def _guide_send(settings: BrokerSettings, queue: str, body: dict) -> None:
    params = pika.ConnectionParameters(host=settings.host, port=settings.port)
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.queue_declare(queue=queue, durable=True)
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=json.dumps(body),
            properties=pika.BasicProperties(delivery_mode=2),
        )
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


def _guide_declare(queue: str) -> None:
    """The backend's declaration, from the service guide, verbatim."""
    with channel() as ch:
        ch.queue_declare(queue=queue, durable=True)


def _spawn_logged(stack: dict, log_path: Path, *extra: str) -> subprocess.Popen:
    """A worker subprocess whose output goes to ``log_path``."""
    return _spawn_worker(stack, *extra, log_path=log_path)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


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
