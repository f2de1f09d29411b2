"""The store's clock (``lightning_lora.clients.store_clock``): the ``Date`` of its answers."""

from __future__ import annotations

import time

from lightning_lora.clients.storage import S3Storage
from lightning_lora.clients.store_clock import StoreClock


def test_the_offset_comes_from_the_date_header() -> None:
    wall = [1_000_000.0]
    clock = StoreClock(lambda: wall[0])
    assert clock() == 1_000_000.0 and not clock.synced  # the wall clock until an answer
    clock.observe("Sun, 06 Dec 2026 01:00:00 GMT")
    assert clock.synced
    store_time = 1796518800.0  # 2026-12-06T01:00:00Z, the middle of its second
    assert clock() == store_time + 0.5
    wall[0] += 10.0
    assert clock() == store_time + 10.5  # the offset holds between answers
    clock.observe("not a date")
    clock.observe(None)
    assert clock() == store_time + 10.5  # unreadable headers change nothing


def test_a_worker_whose_clock_runs_an_hour_ahead_reads_the_stores_time(s3_env: S3Storage) -> None:
    ahead = S3Storage(
        s3_env.bucket,
        endpoint_url=s3_env.endpoint_url,
        retry_budget_s=2,
        wall=lambda: time.time() + 3600,
    )
    assert abs(ahead.clock() - time.time() - 3600) < 1  # before any answer: its own clock
    assert ahead.exists("no-such-key") is False  # one answer (a 404 carries a Date too)
    assert ahead.clock.synced
    assert abs(ahead.clock() - time.time()) < 5  # moto runs on this machine's clock
