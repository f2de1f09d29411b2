"""The store's clock (``lightning_lora.clients.store_clock``): the ``Date`` of its answers."""

from __future__ import annotations

import time

from lightning_lora.clients.storage import S3Storage
from lightning_lora.clients.store_clock import StoreClock

D = 1796518800.0  # Sun, 06 Dec 2026 01:00:00 GMT
DATE = "Sun, 06 Dec 2026 01:00:00 GMT"


def test_answers_narrow_the_offset_and_it_then_holds_still() -> None:
    wall = [D - 100.0]  # this machine runs 100 s behind the store
    clock = StoreClock(lambda: wall[0])
    assert clock() == D - 100.0 and not clock.synced  # the wall clock until an answer
    # an answer sent at wall D-100.2 and back at D-99.9: the store said 01:00:00
    clock.observe(DATE, D - 100.2, D - 99.9)
    assert clock.synced
    assert (round(clock._low, 6), round(clock._high, 6)) == (99.9, 101.2)  # [D - w1, D + 1 - w0]
    clock.observe("Sun, 06 Dec 2026 01:00:01 GMT", D - 99.05, D - 98.95)  # a second later
    assert (round(clock._low, 6), round(clock._high, 6)) == (99.95, 101.05)
    clock.observe(DATE, D - 99.35, D - 99.3)
    assert round(clock._high, 6) == 100.35
    assert abs(clock.offset_s - 100.15) < 1e-6
    before = clock()
    wall[0] += 10.0
    assert abs(clock() - before - 10.0) < 1e-6  # readings move as the wall clock does
    clock.observe("not a date", wall[0], wall[0])
    clock.observe(None, wall[0], wall[0])
    assert abs(clock.offset_s - 100.15) < 1e-6  # unreadable headers change nothing


def test_a_stepped_wall_clock_starts_the_interval_afresh() -> None:
    clock = StoreClock(lambda: 0.0)
    clock.observe(DATE, D - 0.1, D)
    assert abs(clock.offset_s) < 1.0
    clock.observe(DATE, D - 3600.1, D - 3600.0)  # the wall clock was set back an hour
    assert 3599.0 < clock.offset_s < 3601.0


def test_a_worker_whose_clock_runs_an_hour_ahead_reads_the_stores_time(s3_env: S3Storage) -> None:
    ahead = S3Storage(
        s3_env.bucket,
        endpoint_url=s3_env.endpoint_url,
        retry_budget_s=2,
        wall=lambda: time.time() + 3600,
    )
    assert abs(ahead.clock() - time.time() - 3600) < 1  # before any answer: its own clock
    for _ in range(5):
        assert ahead.exists("no-such-key") is False  # answers (a 404 carries a Date too)
    assert ahead.clock.synced
    assert abs(ahead.clock() - time.time()) < 1.5  # moto runs on this machine's clock
