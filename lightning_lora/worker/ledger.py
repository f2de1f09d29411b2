"""The worker fleet's shared job state in S3: runs, leases, outcomes and the webhook outbox.

Several workers share one queue and brokers restart, so the broker alone can deliver a job
twice at once (a worker's connection drops while it trains: the broker hands the unacked
message to another worker). The bucket holds what makes each job run and report once:

* **Runs.** A job's key is its ``message_id``, else a hash of its body
  (:func:`~lightning_lora.layout.job_key_for`). A first delivery of a message without a
  ``message_id`` is a new publication (the backend may publish the same body again to retrain a
  style), so it starts a new *generation* of that key; a redelivery (the broker's
  ``redelivered`` flag or a delivery count) continues the newest one (:meth:`Ledger.resolve_run`).
* **Leases.** Only the holder of a run's lease trains it. The lease is taken with a conditional
  write (``If-None-Match: *``, or ``If-Match`` on the old version to take over), renewed while
  training, and counts as gone once it expires or its holder process is dead (same host), so a
  crashed worker's run is resumed by another one (:meth:`Ledger.acquire`). Each take-over after
  a crash counts an attempt: the delivery count for queues that give none.
* **Outcomes.** A run's terminal webhook is created once (``If-None-Match: *``) in
  ``outcome.json``; only its creator sends it, and it keeps the event's id and timestamp so that
  every re-send is the same event (:meth:`Ledger.create_outcome`).
* **Outbox.** Until the backend answers 2xx, the outcome also sits in ``outbox/`` where every
  worker's :class:`~lightning_lora.worker.outbox.Outbox` re-sends it with growing backoff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil

from lightning_lora.clients.storage import S3Storage
from lightning_lora.errors import PreconditionFailedError, StorageUnavailableError
from lightning_lora.layout import (
    job_pointer_key,
    lease_key,
    outbox_key,
    outcome_key,
    run_id_for,
)

__all__ = ["Holder", "Lease", "LeaseBusy", "Ledger", "RunRef"]

log = logging.getLogger(__name__)

_MAX_CAS_TRIES = 20


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease: a worker process."""

    worker_id: str
    host: str
    pid: int
    create_time: float

    @classmethod
    def this_process(cls) -> Holder:
        """The current process, with a random id so two ledgers in one process differ."""
        pid = os.getpid()
        return cls(
            worker_id=f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}",
            host=socket.gethostname(),
            pid=pid,
            create_time=psutil.Process(pid).create_time(),
        )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Holder:
        """The holder stored in a lease record."""
        return cls(
            worker_id=str(record.get("worker_id", "")),
            host=str(record.get("host", "")),
            pid=int(record.get("pid", 0) or 0),
            create_time=float(record.get("create_time", 0.0) or 0.0),
        )

    def is_dead_here(self) -> bool:
        """Whether this holder is a process of this host that no longer runs."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.create_time) > 1.0
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return True
        except psutil.Error:
            return False


@dataclasses.dataclass(frozen=True)
class RunRef:
    """One run of a job: what every record of it is keyed by."""

    style_id: int
    job_key: str
    generation: int

    @property
    def run_id(self) -> str:
        """The run id (checkpoint folder name)."""
        return run_id_for(self.job_key, self.generation)


class LeaseBusy(Exception):
    """Another live worker holds the run's lease."""

    def __init__(self, holder: Holder, expires_at: float) -> None:
        super().__init__(f"held by {holder.worker_id} until {expires_at:.0f}")
        self.holder = holder
        self.expires_at = expires_at


class Lease:
    """A held lease; renewed from a background thread until released.

    Attributes:
        attempts: How many times the run was taken (1 on the first; +1 per take-over after the
            holder crashed; a graceful release does not count).
        lost: Set when a renewal found that another worker took the lease.
    """

    def __init__(self, ledger: Ledger, run: RunRef, record: dict[str, Any], etag: str) -> None:
        self._ledger = ledger
        self.run = run
        self.record = record
        self.etag = etag
        self.attempts = int(record["attempts"])
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease-{run.run_id}", daemon=True
        )
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = max(0.2, self._ledger.lease_ttl_s / 3)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except PreconditionFailedError:
                log.error("run %s: lease taken by another worker", self.run.run_id)
                self.lost.set()
                return
            except Exception as exc:  # S3 blip: try again next interval, the lease may hold
                log.warning("run %s: lease not renewed: %s", self.run.run_id, exc)

    def renew(self) -> None:
        """Extend the lease (compare-and-set on its version).

        Raises:
            PreconditionFailedError: Someone else wrote the lease: it is lost.
        """
        with self._lock:
            record = {**self.record, "expires_at": self._ledger.clock() + self._ledger.lease_ttl_s}
            self.etag = self._ledger.storage.put_json(
                lease_key(self.run.style_id, self.run.run_id), record, if_match=self.etag
            )
            self.record = record

    def release(self, *, finished: bool) -> None:
        """Stop renewing and give the lease up.

        Args:
            finished: The run has its outcome: delete the lease. Otherwise (graceful stop,
                requeue) mark it released, keeping the attempt count without adding to it.
        """
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        if self.lost.is_set():
            return
        key = lease_key(self.run.style_id, self.run.run_id)
        try:
            with self._lock:
                if finished:
                    self._ledger.storage.delete_key(key, if_match=self.etag)
                else:
                    released = {**self.record, "released": True, "expires_at": 0}
                    self._ledger.storage.put_json(key, released, if_match=self.etag)
        except Exception as exc:  # it expires by itself
            log.warning("run %s: lease not released: %s", self.run.run_id, exc)


class Ledger:
    """Runs, leases, outcomes and the outbox of one bucket.

    Args:
        storage: The bucket.
        lease_ttl_s: How long a lease lasts without renewal (renewed every third of it).
        clock: Wall clock in seconds (leases are compared across machines).
    """

    def __init__(
        self,
        storage: S3Storage,
        lease_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be > 0")
        self.storage = storage
        self.lease_ttl_s = float(lease_ttl_s)
        self.clock = clock
        self.holder = Holder.this_process()

    # ----------------------------------------------------------------- runs

    def resolve_run(self, style_id: int, job_key: str, *, new_publication: bool) -> RunRef:
        """The run a delivery belongs to.

        Args:
            style_id: The job's style.
            job_key: The job's key.
            new_publication: A first delivery of a message without ``message_id``: start a new
                generation. Otherwise continue the newest generation (the first if none).

        Returns:
            The run.
        """
        key = job_pointer_key(style_id, job_key)
        for _ in range(_MAX_CAS_TRIES):
            found = self.storage.get_json(key)
            try:
                if found is None:
                    self.storage.put_json(key, self._pointer(1), if_none_match=True)
                    return RunRef(style_id, job_key, 1)
                record, etag = found
                generation = int(record.get("generation", 1))
                if not new_publication:
                    return RunRef(style_id, job_key, generation)
                self.storage.put_json(key, self._pointer(generation + 1), if_match=etag)
                return RunRef(style_id, job_key, generation + 1)
            except PreconditionFailedError:
                continue  # another worker moved the pointer first: read it again
        raise StorageUnavailableError(f"could not settle the generation of job {job_key}")

    def _pointer(self, generation: int) -> dict[str, Any]:
        return {"generation": generation, "updated_at": self.clock()}

    # ----------------------------------------------------------------- leases

    def acquire(self, run: RunRef) -> Lease:
        """Take the run's lease.

        Returns:
            The lease, renewed in the background until released.

        Raises:
            LeaseBusy: Another live worker holds it (not expired, holder not known dead).
        """
        key = lease_key(run.style_id, run.run_id)
        for _ in range(_MAX_CAS_TRIES):
            found = self.storage.get_json(key)
            now = self.clock()
            try:
                if found is None:
                    record = self._lease_record(run, attempts=1, now=now)
                    etag = self.storage.put_json(key, record, if_none_match=True)
                    return Lease(self, run, record, etag)
                current, etag = found
                holder = Holder.from_record(current.get("holder") or {})
                released = bool(current.get("released"))
                expired = float(current.get("expires_at", 0)) <= now
                alive = not (released or expired or holder.is_dead_here())
                if alive and holder.worker_id != self.holder.worker_id:
                    raise LeaseBusy(holder, float(current.get("expires_at", 0)))
                attempts = int(current.get("attempts", 0)) + (0 if released else 1)
                if not released:
                    log.warning(
                        "run %s: taking over from %s (%s); attempt %d",
                        run.run_id,
                        holder.worker_id,
                        "expired" if expired else "its process is gone",
                        attempts,
                    )
                record = self._lease_record(run, attempts=attempts, now=now)
                etag = self.storage.put_json(key, record, if_match=etag)
                return Lease(self, run, record, etag)
            except PreconditionFailedError:
                continue
        raise StorageUnavailableError(f"could not settle the lease of run {run.run_id}")

    def _lease_record(self, run: RunRef, attempts: int, now: float) -> dict[str, Any]:
        return {
            "run_id": run.run_id,
            "holder": dataclasses.asdict(self.holder),
            "attempts": attempts,
            "acquired_at": now,
            "expires_at": now + self.lease_ttl_s,
            "released": False,
        }

    # ----------------------------------------------------------------- outcomes and outbox

    def outcome(self, run: RunRef) -> tuple[dict[str, Any], str] | None:
        """The run's outcome record and its ETag, if the run has one."""
        return self.storage.get_json(outcome_key(run.style_id, run.run_id))

    def create_outcome(self, run: RunRef, event: dict[str, Any], hold_s: float = 0.0) -> bool:
        """Record the run's terminal event, once across all workers, and queue it in the outbox.

        Args:
            run: The run.
            event: The event (``kind``, ``method``, ``path``, ``payload``, ``event_id``,
                ``timestamp``, ``webhook_url``, ``body_b64`` ...).
            hold_s: The outbox leaves the entry alone this long (the creator's first delivery is
                in progress; an outbox sending it meanwhile would deliver it twice).

        Returns:
            ``True`` if this call created it (the caller sends it), ``False`` if the run already
            had an outcome (someone else reports it).
        """
        record = {**event, "delivered": False, "created_at": self.clock()}
        try:
            self.storage.put_json(outcome_key(run.style_id, run.run_id), record, if_none_match=True)
        except PreconditionFailedError:
            return False
        self.queue_outbox(run, record, due_in_s=hold_s)
        return True

    def queue_outbox(self, run: RunRef, outcome: dict[str, Any], due_in_s: float = 0.0) -> None:
        """Put (or put back) the outcome's outbox entry, due in ``due_in_s`` seconds."""
        entry = {
            **outcome,
            "style_id": run.style_id,
            "job_key": run.job_key,
            "generation": run.generation,
            "attempts": int(outcome.get("attempts", 0)),
            "next_attempt_at": self.clock() + due_in_s,
        }
        self.storage.put_json(outbox_key(run.style_id, run.run_id), entry)

    def hand_to_outbox(self, run: RunRef) -> None:
        """The first delivery gave up: make the outbox entry due now (lift the hold)."""
        key = outbox_key(run.style_id, run.run_id)
        found = self.storage.get_json(key)
        if found is not None:
            entry, etag = found
            with contextlib.suppress(PreconditionFailedError):  # an outbox already took it
                self.storage.put_json(
                    key, {**entry, "next_attempt_at": self.clock()}, if_match=etag
                )

    def mark_delivered(self, run: RunRef) -> None:
        """The backend answered 2xx: flag the outcome and drop the outbox entry."""
        found = self.outcome(run)
        if found is not None and not found[0].get("delivered"):
            record, etag = found
            with contextlib.suppress(PreconditionFailedError):  # another worker marked it
                self.storage.put_json(
                    outcome_key(run.style_id, run.run_id),
                    {**record, "delivered": True, "delivered_at": self.clock()},
                    if_match=etag,
                )
        self.storage.delete_key(outbox_key(run.style_id, run.run_id))
