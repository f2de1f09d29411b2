"""A total deadline on every call to the backend (``lightning_lora.clients.http_deadline``).

The receiver dribbles its answer a byte every 50 ms: each byte comes well within any per-read
timeout, so only a deadline on the whole exchange ends the call. Each test bounds the call far
below the answer's own length (minutes) and counts what the server saw: the connection was cut.
"""

from __future__ import annotations

import time

import pytest

from lightning_lora.clients.contract import COMPLETE_PATH, PROGRESS_PATH
from lightning_lora.clients.http_deadline import DeadlineExceeded, request_with_deadline
from lightning_lora.clients.webhook_sender import WebhookSender
from tests.support.broker import wait_for
from tests.support.receiver import Reply, WebhookReceiver
from tests.support.webhooks import fast_client

#: 4,000 bytes of padding a byte every 50 ms: the answer would take more than 3 minutes
DRIBBLE = Reply(200, dribble_s=0.05, pad=4000)
BOUND_S = 30.0
"""Far above each deadline below, far below the dribbled answer's length."""


def test_a_dribbled_answer_is_cut_at_the_deadline(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.set_default(DRIBBLE)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        request_with_deadline("POST", webhook_receiver.base_url + "/x", b"{}", {}, 1.0)
    assert time.monotonic() - started < BOUND_S
    assert len(webhook_receiver.requests) == 1
    assert wait_for(lambda: webhook_receiver.cut_short == 1, 10)  # we hung up on it


def test_a_complete_answer_within_the_deadline_is_read(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.set_default(Reply(201, headers={"Retry-After": "3"}))
    reply = request_with_deadline("PATCH", webhook_receiver.base_url + "/y?a=1", b"{}", {}, 5.0)
    assert reply.status == 201 and reply.header("retry-after") == "3"
    (seen,) = webhook_receiver.requests
    assert (seen.method, seen.path, seen.query) == ("PATCH", "/y", "a=1")


def test_a_terminal_webhook_gives_up_within_its_total_budget(
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.set_default(DRIBBLE)
    client = fast_client(webhook_receiver, timeout_s=1.0, max_total_s=3.0, max_attempts=6)
    started = time.monotonic()
    assert client.send_complete(7, "s3://b/k", {"training_epochs": 1}) is False
    assert time.monotonic() - started < BOUND_S
    attempts = webhook_receiver.requests_to(COMPLETE_PATH)
    assert 1 <= len(attempts) <= 3  # each cut after 1 s, within the 3 s budget
    assert wait_for(lambda: webhook_receiver.cut_short == len(attempts), 10)


def test_a_slow_backend_never_holds_the_end_of_a_job(webhook_receiver: WebhookReceiver) -> None:
    """Progress waiting behind a dribbled one is dropped at the end; the sender stops in time."""
    webhook_receiver.set_default(DRIBBLE)
    sender = WebhookSender(fast_client(webhook_receiver, timeout_s=1.0))
    assert sender.post_progress(7, 1, 4, 25, 30)
    assert webhook_receiver.wait_for(lambda rs: len(rs) == 1, 10)  # being dribbled
    assert sender.post_progress(7, 2, 4, 50, 20)  # waits behind it
    started = time.monotonic()
    assert sender.close(timeout_s=BOUND_S) is True
    assert time.monotonic() - started < BOUND_S
    assert not sender.is_alive
    stats = sender.stats
    assert stats.progress_dropped == 1 and stats.progress_failed == 1
    assert len(webhook_receiver.requests_to(PROGRESS_PATH)) == 1
