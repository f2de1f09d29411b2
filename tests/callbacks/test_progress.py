"""Progress webhooks (``lightning_lora.callbacks.progress``) to a real HTTP receiver.

The contract and the throttle, in the session's production run
(``tests/support/production_run.py``); a hanging receiver never stalls training.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lightning_lora.callbacks.progress import ProgressCallback
from lightning_lora.callbacks.vram import VramCallback
from lightning_lora.clients.contract import PROGRESS_PATH
from lightning_lora.jobs.report import JobReport
from lightning_lora.training.run import train
from tests.support.production_run import (
    FAST,
    NO_LOGGER,
    STYLE_ID,
    ProductionRun,
    assert_headers,
    progress_of,
    sender_for,
    to,
)
from tests.support.receiver import Reply, WebhookReceiver

# trains: make test, not make test-fast
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_progress_webhooks_follow_contract_and_throttle(production_run: ProductionRun) -> None:
    run = production_run
    progress = to(run.requests, PROGRESS_PATH)
    for request in progress:
        assert request.method == "PATCH"
        assert_headers(request)
        assert set(request.json) == {"style_id", "progress"}
        assert request.json["style_id"] == STYLE_ID
        assert set(request.json["progress"]) == {
            "current_epoch",
            "total_epochs",
            "progress_percent",
            "estimated_seconds",
        }
    reports = progress_of(run.requests)
    assert 2 <= len(reports) <= run.elapsed_s / run.interval_s + 2
    assert reports[0]["progress_percent"] == 0
    assert reports[0]["current_epoch"] == 0
    assert reports[-1] == {
        "current_epoch": 6,
        "total_epochs": 6,
        "progress_percent": 100,
        "estimated_seconds": 0,
    }
    epochs = [r["current_epoch"] for r in reports]
    assert epochs == sorted(epochs)
    percents = [r["progress_percent"] for r in reports]
    assert percents == sorted(percents)
    assert all(r["total_epochs"] == 6 for r in reports)
    for report in reports:
        assert isinstance(report["estimated_seconds"], int)
        assert report["estimated_seconds"] >= 0
    # between start and end the ETA is measured: positive while steps are left
    for report in reports[1:-1]:
        assert 0 < report["progress_percent"] < 100
        if report["progress_percent"] < 99:  # 99: all steps done, epoch end or teardown left
            assert report["estimated_seconds"] > 0


def test_hanging_receiver_does_not_stall_training_and_vram_works_without_logger(
    make_cfg: Callable[..., Any], webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    # every request hangs until released: a training loop that waited on the network would
    # never get past its first progress report
    webhook_receiver.set_default(Reply(200, hang=True))
    cfg = make_cfg(*FAST, "trainer.max_epochs=2", *NO_LOGGER, output_dir=tmp_path / "hung")
    sender = sender_for(webhook_receiver, timeout_s=30.0)
    webhook = ProgressCallback(JobReport(sender, STYLE_ID), interval_s=0.0)  # after every step
    vram = VramCallback(every_n_steps=1)
    try:
        result = train(cfg, callbacks=[webhook, vram])
        # the event order proves it: training ended while the first request was unanswered
        assert webhook_receiver.in_flight == 1 and not webhook_receiver.released
        assert len(webhook_receiver.requests) == 1
        assert webhook.progress_reports >= 6  # all posted, coalesced behind the hung one
    finally:
        webhook_receiver.release()
        threading.Thread(target=sender.close, daemon=True).start()
    # VramCallback with logger=null: measured, in the metrics and the summary
    assert vram.peak_rss_gib > 0 and vram.peak_gib is None
    assert result.metrics["mem/rss_gib"] > 0
    assert result.metrics["peak_rss_gib"] == pytest.approx(vram.peak_rss_gib)
