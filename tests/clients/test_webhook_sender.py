"""The webhook sender's background thread (``lightning_lora.clients.webhook_sender``) against
a real local HTTP server."""

from __future__ import annotations

import time

from lightning_lora.clients.contract import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH
from lightning_lora.clients.webhook_sender import WebhookSender
from tests.support.receiver import Reply, WebhookReceiver
from tests.support.webhooks import fast_client


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
