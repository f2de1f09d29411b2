"""The run ledger in the job bucket (``lightning_lora.worker.ledger``), on moto's S3 server.

Two :class:`Ledger` objects on one bucket are two workers. Their clock is a
:class:`~tests.support.clock.FakeClock`, so expiries are reached by moving it, never by sleeping:

* runs: a new publication starts a new generation, a redelivery continues the newest one;
* leases: a live holder keeps its run (``LeaseBusy``); an expired or released lease is taken
  over (a take-over after a crash counts an attempt, a release does not); a holder whose process
  is gone on this host is taken over at once, one in another pid namespace or on another host
  only once its lease expires;
* outcomes: created once across workers, flagged delivered, kept in the outbox until then; an
  outbox send is claimed by compare-and-set, so two workers never both send it;
* end to end, through the worker: a foreign lease waited for, the same body published again.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from lightning_lora.clients.contract import COMPLETE_PATH
from lightning_lora.clients.storage import S3Storage
from lightning_lora.errors import DownloadError, PreconditionFailedError
from lightning_lora.jobs.layout import job_pointer_key, lease_key, outbox_key, outcome_key
from lightning_lora.worker.consumer import Consumer
from lightning_lora.worker.ledger import Lease, LeaseBusy, Ledger
from lightning_lora.worker.owners import pid_namespace
from lightning_lora.worker.records import Holder, LeaseRecord, RunRef, TerminalEvent
from tests.support.broker import depth, running, wait_for
from tests.support.clock import FakeClock
from tests.support.worker_stack import (
    _accepted,
    _delivery,
    _guide_publish,
    _job,
    _wait_terminal,
    _worker,
)

TTL_S = 60.0
RUN = RunRef(7, "run-1", 1)
WEBHOOK_URL = "http://backend:8000"
BODY = b'{"style_id": 7}'


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledgers(s3_env: S3Storage, clock: FakeClock) -> tuple[Ledger, Ledger]:
    """Two workers' ledgers on one fresh bucket, sharing the test's clock."""
    return Ledger(s3_env, TTL_S, clock), Ledger(s3_env, TTL_S, clock)


@pytest.fixture
def held() -> Iterator[list[Lease]]:
    """Leases taken by the test; their renewal threads are stopped afterwards."""
    leases: list[Lease] = []
    yield leases
    for lease in leases:
        lease.release(finished=False)


def _completion(ledger: Ledger, run: RunRef = RUN) -> TerminalEvent:
    payload = {"style_id": run.style_id, "model_url": "s3://b/m.safetensors", "metadata": {}}
    return ledger.new_event(run, "complete", payload, WEBHOOK_URL, BODY)


def _dead_pid() -> tuple[int, float]:
    """The pid and create time of a process of this host that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    create_time = psutil.Process(proc.pid).create_time()  # readable until reaped, even exited
    proc.wait(30)
    return proc.pid, create_time


def _foreign_lease(ledger: Ledger, holder: Holder, clock: FakeClock) -> None:
    """A live-looking lease of ``RUN`` (attempt 1, an hour left) held by ``holder``."""
    record = LeaseRecord(RUN.run_id, holder, 1, clock(), clock() + 3600)
    ledger.write_lease(RUN, record)


# ------------------------------------------------------------------ runs


def test_a_new_publication_is_a_new_generation_and_a_redelivery_continues_it(
    ledgers: tuple[Ledger, Ledger], s3_env: S3Storage
) -> None:
    a, b = ledgers
    first = a.resolve_run(7, "sha-abc", new_publication=True)
    assert first == RunRef(7, "sha-abc", 1) and first.run_id == "sha-abc"
    assert a.resolve_run(7, "sha-abc", new_publication=False) == first  # a redelivery
    assert b.resolve_run(7, "sha-abc", new_publication=False) == first  # ... on another worker
    second = b.resolve_run(7, "sha-abc", new_publication=True)  # the same body published again
    assert second == RunRef(7, "sha-abc", 2) and second.run_id == "sha-abc.g2"
    assert a.resolve_run(7, "sha-abc", new_publication=False) == second
    assert a.resolve_run(7, "sha-abc", new_publication=True).generation == 3
    pointer, _ = s3_env.get_json(job_pointer_key(7, "sha-abc"))
    assert pointer["generation"] == 3
    # a key seen first as a redelivery starts (and records) generation 1; styles are apart
    assert b.resolve_run(7, "mid-xyz", new_publication=False).generation == 1
    assert s3_env.get_json(job_pointer_key(7, "mid-xyz"))[0]["generation"] == 1
    assert a.resolve_run(8, "sha-abc", new_publication=False) == RunRef(8, "sha-abc", 1)


# ------------------------------------------------------------------ leases


def test_a_held_lease_is_busy_for_another_worker(
    ledgers: tuple[Ledger, Ledger], clock: FakeClock, held: list[Lease]
) -> None:
    a, b = ledgers
    held.append(a.acquire(RUN))
    assert held[0].attempts == 1
    with pytest.raises(LeaseBusy) as busy:
        b.acquire(RUN)
    assert busy.value.holder == a.holder and busy.value.expires_at == clock() + TTL_S
    clock.advance(TTL_S - 1)  # not expired yet
    with pytest.raises(LeaseBusy):
        b.acquire(RUN)
    lease = a.lease(RUN)
    assert lease is not None and lease.holder == a.holder and lease.attempts == 1


def test_leases_are_judged_on_the_stores_clock_not_the_workers(
    s3_env: S3Storage, held: list[Lease]
) -> None:
    """A worker whose clock runs far ahead (twice the lease's life) does not take a live lease:
    both ledgers read the store's time. On its own clock, it would."""
    ttl_s = 30.0
    a = Ledger(s3_env, ttl_s)
    ahead = S3Storage(
        s3_env.bucket,
        endpoint_url=s3_env.endpoint_url,
        retry_budget_s=2,
        wall=lambda: time.time() + 2 * ttl_s,
    )
    b = Ledger(ahead, ttl_s)
    held.append(a.acquire(RUN))
    with pytest.raises(LeaseBusy):
        b.acquire(RUN)
    assert abs(b.clock() - a.clock()) < 5 and ahead.clock.synced
    on_its_own_clock = Ledger(ahead, ttl_s, clock=lambda: time.time() + 2 * ttl_s)
    held.append(on_its_own_clock.acquire(RUN))  # the hazard the store's clock removes
    assert held[-1].attempts == 2


def test_an_expired_lease_is_taken_over_as_another_attempt(
    ledgers: tuple[Ledger, Ledger], clock: FakeClock, held: list[Lease]
) -> None:
    a, b = ledgers
    first = a.acquire(RUN)
    held.append(first)
    clock.advance(TTL_S)  # the holder stopped renewing: it crashed
    second = b.acquire(RUN)
    held.append(second)
    assert second.attempts == 2
    lease = b.lease(RUN)
    assert lease is not None and lease.holder == b.holder and lease.attempts == 2
    assert lease.expires_at == clock() + TTL_S
    # the old holder can neither renew nor release over the new one
    with pytest.raises(PreconditionFailedError):
        first.renew()
    first.release(finished=False)
    held.remove(first)
    assert b.lease(RUN) == lease
    with pytest.raises(LeaseBusy):
        a.acquire(RUN)


def test_a_released_lease_is_taken_over_without_counting_an_attempt(
    ledgers: tuple[Ledger, Ledger], held: list[Lease]
) -> None:
    a, b = ledgers
    a.acquire(RUN).release(finished=False)  # a graceful stop: the job goes back to the queue
    released = a.lease(RUN)
    assert released is not None and released.released and released.expires_at == 0.0
    taken = b.acquire(RUN)
    held.append(taken)
    assert taken.attempts == 1  # not a crash
    taken.release(finished=True)  # the run has its outcome: the lease is deleted
    held.remove(taken)
    assert a.lease(RUN) is None
    again = a.acquire(RUN)
    held.append(again)
    assert again.attempts == 1


@pytest.mark.skipif(pid_namespace() is None, reason="no /proc/self/ns/pid")
def test_a_holder_whose_process_is_gone_on_this_host_is_taken_over_at_once(
    ledgers: tuple[Ledger, Ledger], clock: FakeClock, held: list[Lease]
) -> None:
    a, _ = ledgers
    pid, create_time = _dead_pid()
    dead = Holder(f"crashed:{pid}:x", socket.gethostname(), pid, create_time, pid_namespace())
    _foreign_lease(a, dead, clock)
    assert dead.owner.gone() is not None
    lease = a.acquire(RUN)  # an hour before the lease would expire
    held.append(lease)
    assert lease.attempts == 2
    record = a.lease(RUN)
    assert record is not None and record.holder == a.holder


@pytest.mark.parametrize("where", ["other-pid-namespace", "unknown-pid-namespace", "other-host"])
def test_a_holder_elsewhere_is_not_taken_over_before_its_lease_expires(
    ledgers: tuple[Ledger, Ledger], clock: FakeClock, held: list[Lease], where: str
) -> None:
    """Its pid means nothing here (even one that has exited here): only expiry frees the run."""
    a, _ = ledgers
    pid, create_time = _dead_pid()
    ours = pid_namespace()
    host, pid_ns = {
        "other-pid-namespace": (socket.gethostname(), (ours or 0) + 1),
        "unknown-pid-namespace": (socket.gethostname(), None),  # a holder of an older worker
        "other-host": (f"not-{socket.gethostname()}", ours),
    }[where]
    holder = Holder("elsewhere:1:x", host, pid, create_time, pid_ns)
    _foreign_lease(a, holder, clock)
    assert holder.owner.gone() is None
    with pytest.raises(LeaseBusy) as busy:
        a.acquire(RUN)
    assert busy.value.holder == holder
    clock.advance(3599)
    with pytest.raises(LeaseBusy):
        a.acquire(RUN)
    clock.advance(1)  # expired
    lease = a.acquire(RUN)
    held.append(lease)
    assert lease.attempts == 2


def test_a_malformed_lease_is_named_not_guessed(
    ledgers: tuple[Ledger, Ledger], s3_env: S3Storage
) -> None:
    a, _ = ledgers
    s3_env.put_json(lease_key(7, RUN.run_id), {"run_id": RUN.run_id, "attempts": "many"})
    with pytest.raises(DownloadError, match=f"{lease_key(7, RUN.run_id)}.*attempts"):
        a.acquire(RUN)


# ------------------------------------------------------------------ outcomes and the outbox


def test_an_outcome_is_created_once_across_workers(
    ledgers: tuple[Ledger, Ledger], s3_env: S3Storage
) -> None:
    a, b = ledgers
    event = _completion(a)
    failure = b.new_event(RUN, "failed", {"style_id": 7, "error_message": "x"}, WEBHOOK_URL, BODY)
    assert a.create_outcome(RUN, event) is True
    assert b.create_outcome(RUN, failure) is False  # another worker already reports the run
    assert a.create_outcome(RUN, event) is False  # once, also for its creator
    outcome = b.outcome(RUN)
    assert outcome is not None and outcome.event == event and not outcome.delivered
    assert a.outbox_keys() == [outbox_key(7, RUN.run_id)]  # queued once, with that event
    found = b.outbox_entry(outbox_key(7, RUN.run_id))
    assert found is not None
    entry, _ = found
    assert (entry.event, entry.run, entry.attempts) == (event, RUN, 0)


def test_the_outbox_holds_an_entry_while_its_first_delivery_runs(
    ledgers: tuple[Ledger, Ledger], clock: FakeClock
) -> None:
    a, b = ledgers
    assert a.create_outcome(RUN, _completion(a), hold_s=30)
    entry, _ = b.outbox_entry(outbox_key(7, RUN.run_id))  # type: ignore[misc]
    assert entry.next_attempt_at == clock() + 30
    a.hand_to_outbox(RUN)  # the first delivery gave up: due now
    entry, _ = b.outbox_entry(outbox_key(7, RUN.run_id))  # type: ignore[misc]
    assert entry.next_attempt_at == clock()


def test_mark_delivered_flags_the_outcome_and_empties_the_outbox(
    ledgers: tuple[Ledger, Ledger], clock: FakeClock
) -> None:
    a, b = ledgers
    event = _completion(a)
    a.create_outcome(RUN, event)
    clock.advance(12.5)
    b.mark_delivered(RUN)
    outcome = a.outcome(RUN)
    assert outcome is not None and outcome.delivered and outcome.delivered_at == clock()
    assert outcome.event == event
    assert a.outbox_keys() == []
    clock.advance(5)
    a.mark_delivered(RUN)  # again (another worker's outbox): nothing changes
    assert a.outcome(RUN) == outcome and a.outbox_keys() == []


def test_ensure_outbox_puts_back_a_lost_entry_and_leaves_a_present_one(
    ledgers: tuple[Ledger, Ledger], s3_env: S3Storage, clock: FakeClock
) -> None:
    a, b = ledgers
    a.create_outcome(RUN, _completion(a))
    key = outbox_key(7, RUN.run_id)
    entry, etag = a.outbox_entry(key)  # type: ignore[misc]
    assert a.claim_outbox(key, entry, etag, next_attempt_at=clock() + 100)
    outcome = b.outcome(RUN)
    assert outcome is not None
    b.ensure_outbox(RUN, outcome)  # present: its schedule and attempts are kept
    kept, _ = b.outbox_entry(key)  # type: ignore[misc]
    assert (kept.attempts, kept.next_attempt_at) == (1, clock() + 100)
    s3_env.delete_key(key)  # lost (e.g. a worker crashed between the two writes)
    b.ensure_outbox(RUN, outcome)
    back, _ = b.outbox_entry(key)  # type: ignore[misc]
    assert back.event == outcome.event and back.created_at == outcome.created_at
    assert (back.attempts, back.next_attempt_at) == (0, clock())


@pytest.mark.parametrize("first", [0, 1])
def test_two_workers_claiming_one_outbox_entry_exactly_one_wins(
    ledgers: tuple[Ledger, Ledger], clock: FakeClock, first: int
) -> None:
    """Both read the entry, then both claim it on what they read (the race, step by step:
    moto's server checks ``If-Match`` and writes in two steps, so true concurrency would test
    moto, not the ledger)."""
    a, b = ledgers
    a.create_outcome(RUN, _completion(a))
    key = outbox_key(7, RUN.run_id)
    reads = [ledger.outbox_entry(key) for ledger in ledgers]
    assert all(r is not None for r in reads) and reads[0][1] == reads[1][1]  # type: ignore[index]
    order = [first, 1 - first]
    wins = {}
    for i in order:
        entry, etag = reads[i]  # type: ignore[misc]
        wins[i] = ledgers[i].claim_outbox(key, entry, etag, next_attempt_at=clock() + 10 + i)
    assert wins == {first: True, 1 - first: False}
    claimed, _ = b.outbox_entry(key)  # type: ignore[misc]
    assert claimed.attempts == 1 and claimed.next_attempt_at == clock() + 10 + first
    # the loser reads again: now it sees the claim and its own next claim needs the new version
    entry, etag = ledgers[1 - first].outbox_entry(key)  # type: ignore[misc]
    assert ledgers[1 - first].claim_outbox(key, entry, etag, next_attempt_at=clock() + 20)
    assert a.outbox_entry(key)[0].attempts == 2  # type: ignore[index]
    assert a.drop_outbox(key, etag) is False  # a stale version is not dropped either
    assert a.outbox_keys() == [key]


# ------------------------------------------------------------------ through the worker


@pytest.mark.slow
def test_a_foreign_lease_is_waited_for_then_taken_over_when_it_expires(stack, caplog) -> None:
    """A run leased by a worker on another host: a redelivery waits while the lease lives and
    takes the run over once it expires (that worker died), resuming and reporting it."""
    caplog.set_level(logging.INFO)
    receiver, broker, storage = stack["receiver"], stack["broker"], stack["storage"]
    worker = _worker(stack, "trainer.max_epochs=1")
    body = _job(stack, 212)
    with running(Consumer(broker, worker.handle, poll_interval=0.2)):
        _guide_publish(broker, body)
        assert _wait_terminal(receiver, 212).path == COMPLETE_PATH
    # the same body again, but redelivered while "another host" still holds the run's lease
    run = worker.ledger.resolve_run(212, _key(body), new_publication=False)
    record, _etag = storage.get_json(outcome_key(212, run.run_id))
    other = {
        "run_id": run.run_id,
        "holder": {"worker_id": "elsewhere:1:x", "host": "elsewhere", "pid": 1, "create_time": 1},
        "attempts": 1,
        "expires_at": time.time() + 3,
        "released": False,
    }
    storage.delete_key(outcome_key(212, run.run_id))
    storage.put_json(lease_key(212, run.run_id), other)
    started = time.monotonic()
    settlement = worker.handle(_delivery(json.dumps(body).encode(), redelivered=True))
    waited = time.monotonic() - started
    assert "is being trained by elsewhere:1:x" in caplog.text
    assert waited >= 2.5  # it waited for the foreign lease to expire, then took over
    assert settlement.outcome.name == "ACK"
    assert len(_accepted(receiver, COMPLETE_PATH, 212)) == 2  # the expired run was finished
    assert record["kind"] == "complete"


def _key(body: dict) -> str:
    from lightning_lora.jobs.layout import job_key_for

    return job_key_for(None, json.dumps(body).encode())


@pytest.mark.slow
def test_the_same_body_published_again_is_a_new_job(stack) -> None:
    receiver, broker = stack["receiver"], stack["broker"]
    worker = _worker(stack, "trainer.max_epochs=1")
    body = _job(stack, 221)
    with running(Consumer(broker, worker.handle, poll_interval=0.2)):
        _guide_publish(broker, body)
        receiver.wait_for(lambda reqs: len(_accepted(receiver, COMPLETE_PATH, 221)) == 1, 240)
        _guide_publish(broker, body)  # the backend retrains the style: same JSON, no message_id
        receiver.wait_for(lambda reqs: len(_accepted(receiver, COMPLETE_PATH, 221)) == 2, 240)
        assert wait_for(lambda: depth(broker.queue) == 0 and worker.jobs_done == 2, 30)
    first, second = _accepted(receiver, COMPLETE_PATH, 221)
    assert first.header("Idempotency-Key") != second.header("Idempotency-Key")
    assert first.header("webhook-id") == first.header("Idempotency-Key")
