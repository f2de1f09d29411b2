"""Webhook client and sender against a real local HTTP server."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from lightning_lora.clients.contract import (
    COMPLETE_PATH,
    FAILED_PATH,
    MAX_ERROR_MESSAGE_CHARS,
    PROGRESS_PATH,
)
from lightning_lora.clients.redaction import RedactingFilter, install_redaction, redact
from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_sender import WebhookSender
from tests.support.receiver import RecordedRequest, Reply, WebhookReceiver

TOKEN = "tok-5ecret-value-123"


def fast_client(receiver: WebhookReceiver, **overrides: object) -> WebhookClient:
    """A client with short timeouts and backoffs, suitable for tests."""
    options: dict[str, object] = {
        "token": TOKEN,
        "timeout_s": 2.0,
        "max_attempts": 4,
        "max_total_s": 10.0,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    options.update(overrides)
    return WebhookClient(receiver.base_url, **options)  # type: ignore[arg-type]


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_contract_headers(request: RecordedRequest) -> None:
    assert request.header("Authorization") == f"Bearer {TOKEN}"
    assert request.header("X-Request-Source") == "training-server"
    assert request.header("Content-Type") == "application/json"


# --------------------------------------------------------------------------- contract


def test_progress_request_matches_contract(webhook_receiver: WebhookReceiver) -> None:
    client = fast_client(webhook_receiver)
    assert client.send_progress(7, 3, 10, 30, 420) is True
    (request,) = webhook_receiver.requests
    assert (request.method, request.path) == ("PATCH", PROGRESS_PATH)
    assert PROGRESS_PATH == "/api/webhooks/training/progress"
    assert_contract_headers(request)
    assert request.json == {
        "style_id": 7,
        "progress": {
            "current_epoch": 3,
            "total_epochs": 10,
            "progress_percent": 30,
            "estimated_seconds": 420,
        },
    }


def test_complete_request_matches_contract(webhook_receiver: WebhookReceiver) -> None:
    client = fast_client(webhook_receiver)
    metadata = {"training_epochs": 10, "lora_rank": 16, "lora_alpha": 16, "loss": float("nan")}
    url = "s3://stylelicense-models/models/style_7/lora_weights.safetensors"
    assert client.send_complete(7, url, metadata) is True
    (request,) = webhook_receiver.requests
    assert (request.method, request.path) == ("POST", "/api/webhooks/training/complete")
    assert_contract_headers(request)
    assert request.json == {
        "style_id": 7,
        "model_url": url,
        "metadata": {"training_epochs": 10, "lora_rank": 16, "lora_alpha": 16, "loss": None},
    }


def test_failed_request_matches_contract_redacted_and_truncated(
    webhook_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-xyz")
    client = fast_client(webhook_receiver)
    message = "boom with aws-secret-xyz and Bearer abc.def " + "x" * 5000
    assert client.send_failed(7, message, "DOWNLOAD_FAILED") is True
    (request,) = webhook_receiver.requests
    assert (request.method, request.path) == ("POST", "/api/webhooks/training/failed")
    assert_contract_headers(request)
    body = request.json
    assert set(body) == {"style_id", "error_message", "error_code"}
    assert body["style_id"] == 7 and body["error_code"] == "DOWNLOAD_FAILED"
    assert body["error_message"].startswith("boom with *** and Bearer *** x")
    assert len(body["error_message"]) <= MAX_ERROR_MESSAGE_CHARS
    assert "aws-secret-xyz" not in request.body.decode()


def test_token_read_from_env_at_call_time(
    webhook_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = fast_client(webhook_receiver, token=None)
    monkeypatch.setenv("INTERNAL_API_TOKEN", TOKEN)
    assert client.send_progress(1, 1, 2, 50, 10)
    assert_contract_headers(webhook_receiver.requests[0])


# --------------------------------------------------------------------------- retries


def test_retries_after_5xx_then_succeeds(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script(COMPLETE_PATH, 500, 502, 503, 200)
    client = fast_client(webhook_receiver)
    assert client.send_complete(1, "s3://b-1/k", {"training_epochs": 1}) is True
    assert [r.status for r in webhook_receiver.requests] == [500, 502, 503, 200]
    assert len({r.body for r in webhook_receiver.requests}) == 1


def test_retries_after_timeout_then_succeeds(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script(FAILED_PATH, Reply(delay_s=2.0), 200)
    client = fast_client(webhook_receiver, timeout_s=0.3)
    assert client.send_failed(1, "oops", "TRAINING_FAILED") is True
    assert len(webhook_receiver.requests_to(FAILED_PATH)) == 2


def test_client_error_is_not_retried(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script(COMPLETE_PATH, 400, 200)
    client = fast_client(webhook_receiver)
    assert client.send_complete(1, "s3://b-1/k", {}) is False
    assert len(webhook_receiver.requests) == 1


def test_429_is_retried_honouring_retry_after(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script(FAILED_PATH, Reply(429, headers={"Retry-After": "0.3"}), 200)
    client = fast_client(webhook_receiver, backoff_max_s=1.0)
    assert client.send_failed(1, "oops", "TRAINING_FAILED") is True
    first, second = webhook_receiver.requests
    assert second.received_at - first.received_at >= 0.25  # backoff alone is <= 0.01 s


def test_408_is_retried(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script(FAILED_PATH, 408, 200)
    assert fast_client(webhook_receiver).send_failed(1, "oops", "X") is True
    assert len(webhook_receiver.requests) == 2


def test_stops_after_max_attempts(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.set_default(503)
    assert fast_client(webhook_receiver, max_attempts=3).send_failed(1, "e", "X") is False
    assert len(webhook_receiver.requests) == 3


def test_gives_up_within_max_total_s(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.set_default(Reply(hang=True))
    client = fast_client(webhook_receiver, timeout_s=5.0, max_attempts=50, max_total_s=1.0)
    start = time.monotonic()
    assert client.send_complete(1, "s3://b-1/k", {}) is False
    assert time.monotonic() - start < 1.5
    assert not webhook_receiver.released  # every attempt was cut short by the budget


def test_connection_refused_is_retried_then_given_up() -> None:
    client = WebhookClient(
        closed_port_url(), token=TOKEN, timeout_s=1.0, max_attempts=3, backoff_base_s=0.01
    )
    start = time.monotonic()
    assert client.send_failed(1, "e", "X") is False
    assert time.monotonic() - start < 5.0


def test_progress_is_single_attempt_and_never_raises(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.set_default(500)
    client = fast_client(webhook_receiver)
    assert client.send_progress(1, 1, 2, 50, 10) is False
    assert len(webhook_receiver.requests) == 1
    assert client.send_progress(1, float("nan"), 2, 50, 10) is False  # type: ignore[arg-type]
    assert WebhookClient(closed_port_url(), token=TOKEN).send_progress(1, 1, 2, 3, 4) is False


# --------------------------------------------------------------------------- sender


def test_sender_keeps_latest_progress_and_never_drops_complete(
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.set_default(Reply(delay_s=0.2), path=PROGRESS_PATH)
    with WebhookSender(fast_client(webhook_receiver)) as sender:
        for epoch in range(1, 21):
            sender.post_progress(5, epoch, 20, epoch * 5, 100 - epoch)
        assert sender.post_complete(5, "s3://b-1/k", {"training_epochs": 20})
        for epoch in range(21, 25):
            sender.post_progress(5, epoch, 20, 100, 0)
        assert sender.flush(10.0)
        stats = sender.stats
    progress = webhook_receiver.requests_to(PROGRESS_PATH)
    assert len(progress) < 10 and stats.progress_replaced > 10
    epochs = [r.json["progress"]["current_epoch"] for r in progress]
    assert 20 in epochs and epochs[-1] == 24
    completes = webhook_receiver.requests_to(COMPLETE_PATH)
    assert len(completes) == 1 and stats.reliable_sent == 1
    sequence = [
        r.json["progress"]["current_epoch"] if r.path == PROGRESS_PATH else "complete"
        for r in webhook_receiver.requests
    ]
    assert sequence.index(20) < sequence.index("complete")  # progress posted before goes first


def test_sender_sends_reliable_reports_in_order(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script(COMPLETE_PATH, 500, 200)
    with WebhookSender(fast_client(webhook_receiver)) as sender:
        sender.post_complete(1, "s3://b-1/k", {})
        sender.post_failed(2, "e", "X")
        sender.post_progress(3, 1, 2, 50, 1)
        assert sender.flush(10.0)
    paths = [r.path for r in webhook_receiver.requests]
    assert paths == [COMPLETE_PATH, COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH]


def test_post_progress_does_not_wait_on_hanging_receiver(
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.set_default(Reply(hang=True), path=PROGRESS_PATH)
    sender = WebhookSender(fast_client(webhook_receiver, timeout_s=10.0))
    sender.post_progress(1, 1, 10, 10, 90)
    webhook_receiver.wait_for_count(1, PROGRESS_PATH)
    start = time.perf_counter()
    for epoch in range(2, 50):
        assert sender.post_progress(1, epoch, 50, epoch * 2, 50 - epoch)
    sender.post_failed(1, "late failure", "TRAINING_FAILED")
    elapsed = time.perf_counter() - start
    # Returned while the first request is still held by the server.
    assert webhook_receiver.in_flight == 1 and not webhook_receiver.released
    assert elapsed < 0.5  # generous: the real guarantee is the line above
    webhook_receiver.release()
    assert sender.close(10.0)
    assert not sender.is_alive
    paths = [r.path for r in webhook_receiver.requests]
    assert paths == [PROGRESS_PATH, PROGRESS_PATH, FAILED_PATH]
    assert webhook_receiver.requests[1].json["progress"]["current_epoch"] == 49


def test_sender_rejects_posts_after_close(webhook_receiver: WebhookReceiver) -> None:
    sender = WebhookSender(fast_client(webhook_receiver))
    assert sender.close(5.0)
    assert sender.post_progress(1, 1, 2, 3, 4) is False
    assert sender.post_complete(1, "s3://b-1/k", {}) is False
    assert sender.stats.rejected_after_close == 2


# --------------------------------------------------------------------------- secrets


def test_token_never_in_logs_or_repr(
    webhook_receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INTERNAL_API_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    webhook_receiver.script(FAILED_PATH, 500, Reply(delay_s=1.0), 200)
    webhook_receiver.script(COMPLETE_PATH, 401)
    client = fast_client(webhook_receiver, timeout_s=0.3)
    assert client.send_failed(1, f"crash, token was {TOKEN}", "X") is True
    assert client.send_complete(1, "s3://b-1/k", {}) is False
    WebhookClient(closed_port_url(), token=TOKEN, max_attempts=2).send_failed(1, "e", "X")
    with WebhookSender(client) as sender:
        sender.post_progress(1, 1, 2, 3, 4)
        assert TOKEN not in repr(sender)
    assert TOKEN not in repr(client)
    assert "given up" in caplog.text and "delivered after 3 attempt(s)" in caplog.text
    assert TOKEN not in caplog.text
    assert TOKEN not in webhook_receiver.requests_to(FAILED_PATH)[-1].body.decode()


def test_redact_masks_env_secrets_urls_and_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERNAL_API_TOKEN", "internal-token-1")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://user:rabbit%40pw@mq:5672/")
    text = (
        "a internal-token-1 b; amqp://guest:guest-pw@host/vhost; Authorization: Bearer xyz.123;"
        " pw rabbit@pw; http://backend:8000/api"
    )
    assert redact(text) == (
        "a *** b; amqp://guest:***@host/vhost; Authorization: Bearer ***;"
        " pw ***; http://backend:8000/api"
    )


def test_redacting_filter_rewrites_records(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("INTERNAL_API_TOKEN", TOKEN)
    caplog.handler.addFilter(RedactingFilter())
    log = logging.getLogger("tests.redaction")
    try:
        raise RuntimeError(f"failed with {TOKEN}")
    except RuntimeError:
        log.exception("call with %s failed", TOKEN)
    assert "call with *** failed" in caplog.text and "failed with ***" in caplog.text
    assert TOKEN not in caplog.text


def test_install_redaction_is_idempotent() -> None:
    log = logging.getLogger("tests.install_redaction")
    handler = logging.NullHandler()
    log.addHandler(handler)
    try:
        first = install_redaction(log)
        assert install_redaction(log) is first
        assert handler.filters == [first] and log.filters == [first]
    finally:
        log.removeHandler(handler)
        log.removeFilter(first)
