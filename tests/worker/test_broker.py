"""The worker in the platform's real surroundings (GitHub issue 11).

The backend's own queue declaration and publishing code, extension-less image keys, bad
settings, ``--check``, the operations endpoint, log escaping and crashed-job litter; against
the real broker, moto's S3 server, real HTTP receivers and worker subprocesses.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pika
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.settings import SettingsError, load_settings
from tests.support.broker import channel, depth, running, wait_for
from tests.test_worker import (
    TOKEN,
    WORKER_SCRIPT,
    _job,
    _spawn_worker,
    _stop,
    _terminal,
    _wait_terminal,
    _worker,
)
from tests.test_worker import stack as stack

pytestmark = pytest.mark.slow  # trains or runs workers: make test, not make test-fast


def _guide_declare(queue: str) -> None:
    """The backend's declaration, from the service guide, verbatim."""
    with channel() as ch:
        ch.queue_declare(queue=queue, durable=True)


def _guide_publish(queue: str, body: dict) -> None:
    """The backend's publishing code: pika, delivery_mode=2, no message_id, no content_type."""
    with channel() as ch:
        ch.queue_declare(queue=queue, durable=True)
        ch.basic_publish(
            exchange="",
            routing_key=queue,
            body=json.dumps(body),
            properties=pika.BasicProperties(delivery_mode=2),
        )


# ------------------------------------------------------------------ 1. queue declaration


@pytest.mark.parametrize("first", ["backend", "worker"])
def test_the_backends_plain_declaration_works_in_either_order(stack, first: str) -> None:
    receiver, broker = stack["receiver"], stack["broker"]
    worker = _worker(stack, "trainer.max_epochs=1")
    consumer = Consumer(broker, worker.handle, poll_interval=0.2)
    if first == "backend":
        _guide_declare(broker.queue)
    with running(consumer):  # the worker declares (or finds) the queue
        _guide_declare(broker.queue)  # the backend's declaration never fails afterwards
        _guide_publish(broker.queue, _job(stack, 301))
        done = _wait_terminal(receiver, 301)
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
    assert done.path == COMPLETE_PATH, done.json
    _guide_declare(broker.queue)  # and still not after the worker is gone


# ------------------------------------------------------------------ 4. images by content


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
        _guide_publish(broker.queue, _job(stack, 311, image_urls=urls))
        _guide_publish(broker.queue, _job(stack, 312, image_urls=[urls[1], gif]))
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
        _guide_publish(broker.queue, _job(stack, 313, image_urls=[url]))
        failed = _wait_terminal(receiver, 313)
    assert failed.json["error_code"] == "INVALID_IMAGE", failed.json
    assert url in failed.json["error_message"]
    assert "ll-job" not in failed.json["error_message"]


# ------------------------------------------------------------------ 5. settings and --check


def test_settings_are_checked_and_named() -> None:
    ok = load_settings({}, {"INTERNAL_API_TOKEN": "tok-abc\n", "WEBHOOK_ALLOWLIST": "backend:8000"})
    assert ok.internal_api_token.get_secret_value() == "tok-abc"  # a secret file's newline
    assert "tok-abc" not in repr(ok) and "tok-abc" not in json.dumps(ok.public(), default=str)
    cases = {
        "INTERNAL_API_TOKEN": {"INTERNAL_API_TOKEN": "tok\nX-Evil: 1", "WEBHOOK_ALLOWLIST": "b"},
        "WEBHOOK_ALLOWLIST": {"INTERNAL_API_TOKEN": "t"},
        "S3_BUCKET": {"INTERNAL_API_TOKEN": "t", "WEBHOOK_ALLOWLIST": "b", "S3_BUCKET": "My_B"},
        "worker.max_total_bytes": {"INTERNAL_API_TOKEN": "t", "WEBHOOK_ALLOWLIST": "b"},
    }
    for name, env in cases.items():
        section = (
            {"limits": {"max_total_bytes": 10, "max_image_bytes": 20}} if "total" in name else {}
        )
        with pytest.raises(SettingsError, match=name):
            load_settings(section, env)


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(WORKER_SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _scrape(base: str) -> str:
    return requests.get(f"{base}/metrics", timeout=5).text


def _results(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(("ok ", "FAIL "))]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_worker_refuses_bad_settings_and_check_reports_each_dependency(stack) -> None:
    receiver, broker = stack["receiver"], stack["broker"]
    base = {**os.environ, "RABBITMQ_HOST": broker.host, "RABBITMQ_QUEUE": broker.queue}
    bad = _cli(env={**base, "INTERNAL_API_TOKEN": "tok\r\nX: y", "WEBHOOK_ALLOWLIST": "a"})
    assert bad.returncode == 2 and "INTERNAL_API_TOKEN" in bad.stderr, bad.stderr
    assert "tok" not in bad.stderr.replace("INTERNAL_API_TOKEN", "")  # never echoes the value
    empty = _cli(env={**base, "INTERNAL_API_TOKEN": TOKEN, "WEBHOOK_ALLOWLIST": ""})
    assert empty.returncode == 2 and "WEBHOOK_ALLOWLIST" in empty.stderr
    host = receiver.base_url.removeprefix("http://")
    good = {**base, "INTERNAL_API_TOKEN": TOKEN + "\n", "WEBHOOK_ALLOWLIST": host}
    check = _cli("--check", env=good)
    assert check.returncode == 0, check.stdout + check.stderr
    assert [line.split()[:2] for line in _results(check.stdout)] == [
        ["ok", "broker"],
        ["ok", "s3"],
        ["ok", "backend"],
    ]
    down = {
        **good,
        "WEBHOOK_ALLOWLIST": f"{host},127.0.0.1:{_closed_port()}",
        "S3_BUCKET": "no-such-bucket-ll",
    }
    failing = _cli("--check", env=down)
    assert failing.returncode == 1
    lines = _results(failing.stdout)
    assert lines[0].startswith("ok   broker")
    assert lines[1].startswith("FAIL s3") and "no-such-bucket-ll" in lines[1]
    assert lines[2].startswith("ok   backend") and lines[3].startswith("FAIL backend")
    assert TOKEN not in check.stdout + failing.stdout


# ------------------------------------------------------------------ 7, 8. litter, metrics, logs


def test_a_worker_process_cleans_litter_serves_metrics_and_escapes_its_logs(
    stack, tmp_path
) -> None:
    receiver, storage, broker = stack["receiver"], stack["storage"], stack["broker"]
    work = tmp_path / "work"
    work.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = work / "ll-job-old-abc123"
    (stale / "images").mkdir(parents=True)
    (stale / ".owner.json").write_text(
        json.dumps(
            {"pid": dead.pid, "create_time": time.time() - 100, "host": socket.gethostname()}
        )
    )
    (stale / "images" / "big.bin").write_bytes(b"x" * 1_000_000)
    port = _closed_port()
    log_path = tmp_path / "worker.log"
    proc = _spawn_worker(
        stack,
        "trainer.max_epochs=1",
        f"worker.work_dir={work}",
        log_path=log_path,
        env={"METRICS_PORT": str(port), "LOG_LEVEL": "INFO"},
    )
    sneaky = f"s3://{storage.bucket}/up/a\u2028FAKE ERROR forged line\u2029b.png"
    try:
        assert wait_for(lambda: "worker consuming" in log_path.read_text(), 120), _stop(proc)
        assert not stale.exists()  # a dead worker's job folder is removed at start
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
        assert wait_for(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 200, 30)
        _guide_publish(broker.queue, _job(stack, 321))
        _guide_publish(broker.queue, _job(stack, 322, image_urls=[sneaky]))
        assert _wait_terminal(receiver, 321).path == COMPLETE_PATH
        assert _wait_terminal(receiver, 322).json["error_code"] == "DOWNLOAD_FAILED"
        assert wait_for(lambda: depth(broker.queue) == 0, 30)
        # the counters move when the message is settled, just after the webhook
        assert wait_for(lambda: 'code="DOWNLOAD_FAILED"' in _scrape(base), 30)
        text = _scrape(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        output = _stop(proc)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("lightning_lora_worker_jobs_started_total", ())] == 2
    assert samples[("lightning_lora_worker_jobs_completed_total", ())] == 1
    assert samples[("lightning_lora_worker_jobs_failed_total", (("code", "DOWNLOAD_FAILED"),))] == 1
    assert (
        samples[("lightning_lora_worker_job_duration_seconds_count", (("outcome", "completed"),))]
        == 1
    )
    assert samples[("lightning_lora_worker_webhooks_pending", ())] == 0
    assert samples[("lightning_lora_worker_broker_last_seen_age_seconds", ())] < 30
    # one physical line per record: the key's separators and CR/LF are escaped, not written
    assert "\u2028" not in output and "\u2029" not in output
    assert not any(
        line.startswith("FAKE ERROR") or line.startswith("b.png") for line in output.splitlines()
    )
    assert "\\u2028FAKE ERROR" in output
    assert len(_terminal(receiver, 321)) == 1
