"""The job's report (``lightning_lora.jobs.report``): one terminal report, with a real
``WebhookSender`` and ``WebhookClient`` sending to a real HTTP receiver.

The first terminal report wins (a completion then a failure, or the other way round: the second
is refused); an exception that requeues the job reports nothing and leaves the report open; a
completion whose payload is invalid takes nothing; nothing follows the end; closing stops the
sender's thread and the client the report owns; failure messages never carry a secret; the
client is built from ``cfg.reporting.client``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psutil
import pytest
from omegaconf import OmegaConf

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.clients.redaction import MASK, clear_registered_secrets, register_secret
from lightning_lora.clients.webhook_sender import WebhookSender
from lightning_lora.errors import (
    DatasetError,
    DownloadError,
    InvalidImageError,
    JobInterrupted,
    StorageUnavailableError,
)
from lightning_lora.jobs.report import JobReport, error_message_of, webhook_client
from tests.conftest import composed
from tests.support.broker import wait_for
from tests.support.receiver import WebhookReceiver
from tests.support.webhooks import TOKEN, fast_client

STYLE_ID = 7
MODEL_URL = "s3://bkt/models/style_7/lora_weights.safetensors"
METADATA = {"training_epochs": 2, "lora_rank": 16, "lora_alpha": 32}


def _raised_while_handling(first: BaseException, then: BaseException) -> BaseException:
    try:
        try:
            raise first
        except BaseException:
            raise then  # noqa: B904 (its __context__ is the point)
    except BaseException as exc:
        return exc


def _sent(receiver: WebhookReceiver) -> list[str]:
    return [r.path for r in receiver.requests]


def test_a_completion_then_a_failure_sends_the_completion_only(
    webhook_receiver: WebhookReceiver,
) -> None:
    with JobReport(fast_client(webhook_receiver), STYLE_ID) as report:
        assert report.complete(MODEL_URL, METADATA) is True
        assert report.terminal_kind == "complete"
        assert report.fail(RuntimeError("a late error")) is False
        assert report.fail(DatasetError("a late dataset error")) is False
        assert report.complete(MODEL_URL, METADATA) is False
        assert report.terminal_kind == "complete"
    assert _sent(webhook_receiver) == [COMPLETE_PATH]
    body = webhook_receiver.requests[0].json
    assert body == {"style_id": STYLE_ID, "model_url": MODEL_URL, "metadata": METADATA}


def test_a_failure_then_a_completion_sends_the_failure_only(
    webhook_receiver: WebhookReceiver,
) -> None:
    with JobReport(fast_client(webhook_receiver), STYLE_ID) as report:
        assert report.fail(DatasetError("no images in s3://bkt/styles/")) is True
        assert report.terminal_kind == "failed"
        assert report.complete(MODEL_URL, METADATA) is False
        assert report.fail(RuntimeError("again")) is False
    assert _sent(webhook_receiver) == [FAILED_PATH]
    assert webhook_receiver.requests[0].json == {
        "style_id": STYLE_ID,
        "error_message": "no images in s3://bkt/styles/",
        "error_code": "INVALID_DATASET",
    }


def test_an_exception_that_requeues_reports_nothing_and_leaves_the_report_open(
    webhook_receiver: WebhookReceiver,
) -> None:
    requeued = [
        JobInterrupted("the worker is shutting down"),
        StorageUnavailableError("S3 unreachable for 300s"),
        _raised_while_handling(StorageUnavailableError("S3 down"), KeyError("while handling")),
    ]
    with JobReport(fast_client(webhook_receiver), STYLE_ID) as report:
        for exc in requeued:
            assert report.fail(exc) is False
            assert report.terminal_kind is None
        assert report.sender.flush(10)
        assert webhook_receiver.requests == []
        assert report.fail(InvalidImageError("image s3://bkt/a.png is truncated")) is True
    (failed,) = webhook_receiver.requests
    assert failed.path == FAILED_PATH and failed.json["error_code"] == "INVALID_IMAGE"


def test_an_invalid_completion_payload_does_not_take_the_report(
    webhook_receiver: WebhookReceiver,
) -> None:
    with JobReport(fast_client(webhook_receiver), STYLE_ID) as report:
        with pytest.raises(ValueError, match="s3://"):
            report.complete("/tmp/lora.safetensors", METADATA)
        with pytest.raises(TypeError, match="mapping"):
            report.complete(MODEL_URL, ["not", "a", "mapping"])  # type: ignore[arg-type]
        assert report.terminal_kind is None
        assert report.fail(RuntimeError("the upload step broke")) is True  # still reportable
    (failed,) = webhook_receiver.requests
    assert failed.path == FAILED_PATH
    assert failed.json["error_code"] == "TRAINING_FAILED"
    assert failed.json["error_message"] == "RuntimeError: the upload step broke"


def test_no_progress_after_the_end(webhook_receiver: WebhookReceiver) -> None:
    with JobReport(fast_client(webhook_receiver), STYLE_ID) as report:
        assert report.progress(1, 4, 25, 30) is True
        assert report.complete(MODEL_URL, METADATA) is True
        assert report.progress(2, 4, 50, 20) is False
    assert _sent(webhook_receiver) == [PROGRESS_PATH, COMPLETE_PATH]
    assert webhook_receiver.requests[0].json["progress"]["current_epoch"] == 1


def _senders() -> set[threading.Thread]:
    """The live webhook-sender threads of this process."""
    return {t for t in threading.enumerate() if t.name == "webhook-sender" and t.is_alive()}


def _sockets_to(receiver: WebhookReceiver) -> int:
    """This process's open TCP connections to the receiver."""
    port = int(receiver.base_url.rsplit(":", 1)[1])
    return sum(
        1 for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port
    )


def test_close_stops_the_sender_thread_and_nothing_stays_open(
    webhook_receiver: WebhookReceiver,
) -> None:
    before = _senders()
    client = fast_client(webhook_receiver)
    report = JobReport(client, STYLE_ID)
    (thread,) = _senders() - before  # the report started one thread
    assert report.sender.is_alive and thread.is_alive()
    assert report.progress(1, 2, 50, 10) and report.complete(MODEL_URL, METADATA)
    assert report.sender.flush(10)
    assert _sockets_to(webhook_receiver) == 0  # every request closed its own connection
    assert report.close(10) is True
    assert not report.sender.is_alive
    assert wait_for(lambda: not _senders() - before, 10)  # the thread count is back
    assert not thread.is_alive()
    assert report.sender.post_progress(STYLE_ID, 2, 2, 100, 0) is False  # closed for good
    assert _sent(webhook_receiver) == [PROGRESS_PATH, COMPLETE_PATH]


def test_closing_a_report_stops_a_given_sender_too(webhook_receiver: WebhookReceiver) -> None:
    before = _senders()
    sender = WebhookSender(fast_client(webhook_receiver))
    assert len(_senders() - before) == 1
    with JobReport(sender, STYLE_ID) as report:
        assert report.sender is sender
        assert report.fail(RuntimeError("boom")) is True
    assert not sender.is_alive
    assert wait_for(lambda: not _senders() - before, 10)
    assert _sockets_to(webhook_receiver) == 0


@pytest.fixture
def registered_secret() -> Iterator[str]:
    secret = f"reg-{uuid.uuid4().hex}"
    register_secret(secret)
    yield secret
    clear_registered_secrets()


def test_error_messages_never_carry_a_registered_secret(registered_secret: str) -> None:
    secret = registered_secret
    try:
        raise KeyError("lookup failed") from DownloadError(f"object s3://bkt/{secret}/a.png")
    except KeyError as exc:
        chained = exc
    cases = [
        DatasetError(f"bad caption file s3://bkt/{secret}.txt"),
        RuntimeError(f"boom with {secret}"),
        ValueError(secret),
        chained,
        _raised_while_handling(InvalidImageError(f"{secret} is truncated"), OSError("closing")),
    ]
    for exc in cases:
        message = error_message_of(exc)
        assert secret not in message, (exc, message)
        assert MASK in message, (exc, message)
    assert error_message_of(chained).startswith("object s3://bkt/")  # ours: written for it


def test_a_failure_report_masks_registered_secrets_and_the_clients_token(
    webhook_receiver: WebhookReceiver, registered_secret: str
) -> None:
    with JobReport(fast_client(webhook_receiver), STYLE_ID) as report:
        assert report.fail(RuntimeError(f"failed with {registered_secret} and {TOKEN}"))
    (failed,) = webhook_receiver.requests
    body = failed.body.decode()
    assert registered_secret not in body and TOKEN not in body
    assert failed.json["error_message"] == f"RuntimeError: failed with {MASK} and {MASK}"


def test_the_client_takes_its_settings_from_cfg_reporting_client(
    webhook_receiver: WebhookReceiver,
) -> None:
    cfg = composed(
        "reporting.client.timeout_s=3",
        "reporting.client.max_attempts=2",
        "reporting.client.max_total_s=7",
        "reporting.client.backoff_base_s=0.01",
        "reporting.client.backoff_max_s=0.02",
    )
    client = webhook_client(webhook_receiver.base_url, cfg, token=TOKEN)
    try:
        settings = (
            client.timeout_s,
            client.max_attempts,
            client.max_total_s,
            client.backoff_base_s,
            client.backoff_max_s,
        )
        assert settings == (3.0, 2, 7.0, 0.01, 0.02)
        assert client.base_url == webhook_receiver.base_url
        webhook_receiver.set_default(503, path=FAILED_PATH)
        assert client.send_failed(STYLE_ID, "boom", "TRAINING_FAILED") is False
        assert len(webhook_receiver.requests_to(FAILED_PATH)) == 2  # the config's attempts
        assert webhook_receiver.requests[0].header("Authorization") == f"Bearer {TOKEN}"
    finally:
        client.close()
    # without a config, or one without the node: the client's defaults (those of the shipped
    # configs/reporting/default.yaml too)
    for cfg in (None, composed(), OmegaConf.create({"seed": 1})):
        plain = webhook_client("http://backend:8000", cfg)
        assert (plain.timeout_s, plain.max_attempts, plain.max_total_s) == (10.0, 6, 120.0)
        plain.close()


@pytest.mark.slow
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
