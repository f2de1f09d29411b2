"""The webhook client (``lightning_lora.clients.webhook_client``) against a real local HTTP
server: the contract, retries and budgets, the token kept out of logs."""

from __future__ import annotations

import logging
import time

import pytest

from lightning_lora.clients.contract import (
    COMPLETE_PATH,
    FAILED_PATH,
    MAX_ERROR_MESSAGE_CHARS,
    PROGRESS_PATH,
)
from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_sender import WebhookSender
from tests.support.net import closed_port_url
from tests.support.receiver import RecordedRequest, Reply, WebhookReceiver
from tests.support.webhooks import TOKEN, fast_client


def assert_contract_headers(request: RecordedRequest) -> None:
    assert request.header("Authorization") == f"Bearer {TOKEN}"
    assert request.header("X-Request-Source") == "training-server"
    assert request.header("Content-Type") == "application/json"


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
