"""The worker fleet's shared job state in S3: runs, leases, outcomes and the webhook outbox.

Several workers share one queue and brokers restart, so the broker alone can deliver a job
twice at once (a worker's connection drops while it trains: the broker hands the unacked
message to another worker). The bucket holds what makes each job run and report once:

* **Runs.** A job's key is its ``message_id``, else a hash of its body
  (:func:`~lightning_lora.jobs.layout.job_key_for`). A first delivery of a message without a
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
* **Cancels.** A style's newest cancel (:class:`~lightning_lora.worker.records.CancelRecord`):
  opened when a worker takes the backend's cancel message, closed when the barrier it queued
  behind the style's jobs comes out of the work queue; it stops the runs that began before it
  closed, with a margin (:meth:`Ledger.cancel_stopping`).

The ledger owns every one of these keys: nothing else reads or writes them, and each record is a
typed :mod:`lightning_lora.worker.records` dataclass with one reader and one writer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from lightning_lora.clients.storage import S3Storage
from lightning_lora.errors import DownloadError, PreconditionFailedError, StorageUnavailableError
from lightning_lora.jobs.layout import (
    OUTBOX_PREFIX,
    cancel_key,
    job_pointer_key,
    lease_key,
    outbox_key,
    outcome_key,
)
from lightning_lora.worker.records import (
    CancelRecord,
    Holder,
    JobPointer,
    LeaseRecord,
    OutboxEntry,
    OutcomeRecord,
    RecordError,
    RunRef,
    TerminalEvent,
    TerminalKind,
)

__all__ = ["Lease", "LeaseBusy", "Ledger"]

log = logging.getLogger(__name__)

_MAX_CAS_TRIES = 20
R = TypeVar("R")


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

    def __init__(self, ledger: Ledger, run: RunRef, record: LeaseRecord, etag: str) -> None:
        self._ledger = ledger
        self.run = run
        self.record = record
        self.etag = etag
        self.attempts = record.attempts
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
            expires_at = self._ledger.clock() + self._ledger.lease_ttl_s
            self.record, self.etag = self._ledger.write_lease(
                self.run, replace(self.record, expires_at=expires_at), if_match=self.etag
            )

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
        try:
            with self._lock:
                if finished:
                    self._ledger.drop_lease(self.run, if_match=self.etag)
                else:
                    released = replace(self.record, released=True, expires_at=0.0)
                    self._ledger.write_lease(self.run, released, if_match=self.etag)
        except Exception as exc:  # it expires by itself
            log.warning("run %s: lease not released: %s", self.run.run_id, exc)


class Ledger:
    """Runs, leases, outcomes and the outbox of one bucket.

    Args:
        storage: The bucket.
        lease_ttl_s: How long a lease lasts without renewal (renewed every third of it).
        clock: Seconds since the epoch on the clock every worker shares; the store's
            (:attr:`S3Storage.clock <lightning_lora.clients.storage.S3Storage.clock>`, from its
            answers' ``Date`` headers) when ``None``, so a worker's own clock may drift.
        cancel_margin_s: A cancel also stops the runs that began this long after its window
            closed (:meth:`CancelRecord.stops
            <lightning_lora.worker.records.CancelRecord.stops>`).
    """

    def __init__(
        self,
        storage: S3Storage,
        lease_ttl_s: float = 60.0,
        clock: Callable[[], float] | None = None,
        cancel_margin_s: float = 10.0,
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be > 0")
        self.storage = storage
        self.lease_ttl_s = float(lease_ttl_s)
        self.cancel_margin_s = float(cancel_margin_s)
        self.clock: Callable[[], float] = clock if clock is not None else storage.clock
        self.holder = Holder.this_process()

    # ----------------------------------------------------------------- reading records

    def _read(self, key: str, reader: Callable[[Mapping[str, Any]], R]) -> tuple[R, str] | None:
        """A record and its ETag, or ``None`` when absent.

        Raises:
            DownloadError: The record is not one the ledger writes (names its URL).
        """
        found = self.storage.get_json(key)
        if found is None:
            return None
        raw, etag = found
        try:
            return reader(raw), etag
        except RecordError as exc:
            raise DownloadError(f"record {self.storage.s3_url(key)}: {exc}") from exc

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
            found = self._read(key, JobPointer.from_json)
            try:
                if found is None:
                    pointer = JobPointer(1, self.clock())
                    self.storage.put_json(key, pointer.to_json(), if_none_match=True)
                    return RunRef(style_id, job_key, 1, started_at=pointer.updated_at)
                current, etag = found
                if not new_publication:
                    return RunRef(style_id, job_key, current.generation, current.updated_at)
                pointer = JobPointer(current.generation + 1, self.clock())
                self.storage.put_json(key, pointer.to_json(), if_match=etag)
                return RunRef(style_id, job_key, pointer.generation, pointer.updated_at)
            except PreconditionFailedError:
                continue  # another worker moved the pointer first: read it again
        raise StorageUnavailableError(f"could not settle the generation of job {job_key}")

    # ----------------------------------------------------------------- leases

    def lease(self, run: RunRef) -> LeaseRecord | None:
        """The run's lease record, if any."""
        found = self._read(lease_key(run.style_id, run.run_id), LeaseRecord.from_json)
        return None if found is None else found[0]

    def write_lease(
        self, run: RunRef, record: LeaseRecord, *, if_match: str | None = None
    ) -> tuple[LeaseRecord, str]:
        """Write the run's lease (created only if absent when ``if_match`` is ``None``).

        Returns:
            The record written and its new ETag.

        Raises:
            PreconditionFailedError: Another worker wrote it first.
        """
        key = lease_key(run.style_id, run.run_id)
        etag = self.storage.put_json(
            key, record.to_json(), if_none_match=if_match is None, if_match=if_match
        )
        return record, etag

    def drop_lease(self, run: RunRef, *, if_match: str) -> None:
        """Delete the run's lease if it is still the version ``if_match``."""
        self.storage.delete_key(lease_key(run.style_id, run.run_id), if_match=if_match)

    def acquire(self, run: RunRef) -> Lease:
        """Take the run's lease.

        Returns:
            The lease, renewed in the background until released.

        Raises:
            LeaseBusy: Another live worker holds it (not expired, holder not known gone).
        """
        key = lease_key(run.style_id, run.run_id)
        for _ in range(_MAX_CAS_TRIES):
            found = self._read(key, LeaseRecord.from_json)
            now = self.clock()
            try:
                if found is None:
                    record, etag = self.write_lease(run, self._new_lease(run, 1, now))
                    return Lease(self, run, record, etag)
                current, etag = found
                holder = current.holder
                expired = current.expires_at <= now
                gone = None if current.released or expired else holder.owner.gone()
                alive = not (current.released or expired or gone)
                if alive and holder.worker_id != self.holder.worker_id:
                    raise LeaseBusy(holder, current.expires_at)
                attempts = current.attempts + (0 if current.released else 1)
                if not current.released:
                    log.warning(
                        "run %s: taking over from %s (%s); attempt %d",
                        run.run_id,
                        holder.worker_id,
                        "expired" if expired else gone or "it is this worker's",
                        attempts,
                    )
                record, etag = self.write_lease(
                    run, self._new_lease(run, attempts, now), if_match=etag
                )
                return Lease(self, run, record, etag)
            except PreconditionFailedError:
                continue
        raise StorageUnavailableError(f"could not settle the lease of run {run.run_id}")

    def _new_lease(self, run: RunRef, attempts: int, now: float) -> LeaseRecord:
        return LeaseRecord(
            run_id=run.run_id,
            holder=self.holder,
            attempts=attempts,
            acquired_at=now,
            expires_at=now + self.lease_ttl_s,
        )

    # ----------------------------------------------------------------- outcomes

    def new_event(
        self,
        run: RunRef,
        kind: TerminalKind,
        payload: Mapping[str, Any],
        webhook_url: str,
        body: bytes,
    ) -> TerminalEvent:
        """A terminal event of ``run``, created now."""
        if kind not in ("complete", "failed"):
            raise ValueError(f"terminal kind must be 'complete' or 'failed', not {kind!r}")
        return TerminalEvent.create(run, kind, payload, webhook_url, body, self.clock())

    def outcome(self, run: RunRef) -> OutcomeRecord | None:
        """The run's outcome, if it has one."""
        found = self._read(outcome_key(run.style_id, run.run_id), OutcomeRecord.from_json)
        return None if found is None else found[0]

    def create_outcome(self, run: RunRef, event: TerminalEvent, hold_s: float = 0.0) -> bool:
        """Record the run's terminal event, once across all workers, and queue it in the outbox.

        Args:
            run: The run.
            event: Its terminal event.
            hold_s: The outbox leaves the entry alone this long (the creator's first delivery is
                in progress; an outbox sending it meanwhile would deliver it twice).

        Returns:
            ``True`` if this call created it (the caller sends it), ``False`` if the run already
            had an outcome (someone else reports it).
        """
        outcome = OutcomeRecord(event, created_at=self.clock())
        key = outcome_key(run.style_id, run.run_id)
        try:
            self.storage.put_json(key, outcome.to_json(), if_none_match=True)
        except PreconditionFailedError:
            return False
        self._put_outbox(run, outcome, due_in_s=hold_s)
        return True

    def ensure_outbox(self, run: RunRef, outcome: OutcomeRecord) -> None:
        """Put an undelivered outcome back in the outbox if its entry is gone."""
        if self._read(outbox_key(run.style_id, run.run_id), OutboxEntry.from_json) is None:
            self._put_outbox(run, outcome)

    def _put_outbox(self, run: RunRef, outcome: OutcomeRecord, due_in_s: float = 0.0) -> None:
        entry = OutboxEntry(
            event=outcome.event,
            run=run,
            created_at=outcome.created_at,
            next_attempt_at=self.clock() + due_in_s,
        )
        self.storage.put_json(outbox_key(run.style_id, run.run_id), entry.to_json())

    def mark_delivered(self, run: RunRef) -> None:
        """The backend answered 2xx: flag the outcome and drop the outbox entry."""
        key = outcome_key(run.style_id, run.run_id)
        found = self._read(key, OutcomeRecord.from_json)
        if found is not None and not found[0].delivered:
            outcome, etag = found
            delivered = replace(outcome, delivered=True, delivered_at=self.clock())
            with contextlib.suppress(PreconditionFailedError):  # another worker marked it
                self.storage.put_json(key, delivered.to_json(), if_match=etag)
        self.storage.delete_key(outbox_key(run.style_id, run.run_id))

    # ----------------------------------------------------------------- cancels

    def open_cancel(self, style_id: int) -> CancelRecord:
        """Record a new cancel of the style, open until its barrier is taken.

        The newest cancel replaces an earlier one (last writer wins): an open one stays open
        under the new id, a closed one reopens. Both stop every run that began before.

        Returns:
            The cancel (its id goes on the barrier).
        """
        record = CancelRecord(cancel_id=uuid.uuid4().hex, requested_at=self.clock())
        self.storage.put_json(cancel_key(style_id), record.to_json())
        return record

    def close_cancel(self, style_id: int, cancel_id: str) -> bool:
        """Close the cancel ``cancel_id`` (its barrier came out of the work queue).

        Returns:
            ``True`` if this call closed it; ``False`` if it was closed already or a newer
            cancel replaced it (whose own barrier closes it).
        """
        key = cancel_key(style_id)
        for _ in range(_MAX_CAS_TRIES):
            found = self._read(key, CancelRecord.from_json)
            if found is None:
                return False
            current, etag = found
            if current.cancel_id != cancel_id or current.closed_at is not None:
                return False
            closed = replace(current, closed_at=self.clock())
            try:
                self.storage.put_json(key, closed.to_json(), if_match=etag)
                return True
            except PreconditionFailedError:
                continue  # a newer cancel, or another worker closing it: read it again
        raise StorageUnavailableError(f"could not close the cancel {cancel_id}")

    def cancel_stopping(self, run: RunRef) -> CancelRecord | None:
        """The style's cancel if it stops ``run`` (begun before it closed), or ``None``."""
        found = self._read(cancel_key(run.style_id), CancelRecord.from_json)
        if found is None or not found[0].stops(run, self.cancel_margin_s):
            return None
        return found[0]

    # ----------------------------------------------------------------- the outbox

    def outbox_keys(self) -> list[str]:
        """The keys of every pending outbox entry of the fleet."""
        return self.storage.list_keys(OUTBOX_PREFIX)

    def outbox_entry(self, key: str) -> tuple[OutboxEntry, str] | None:
        """An outbox entry and its ETag, or ``None`` once it is gone."""
        return self._read(key, OutboxEntry.from_json)

    def hand_to_outbox(self, run: RunRef) -> None:
        """The first delivery gave up: make the outbox entry due now (lift the hold)."""
        key = outbox_key(run.style_id, run.run_id)
        found = self.outbox_entry(key)
        if found is not None:
            entry, etag = found
            due = replace(entry, next_attempt_at=self.clock())
            with contextlib.suppress(PreconditionFailedError):  # an outbox already took it
                self.storage.put_json(key, due.to_json(), if_match=etag)

    def claim_outbox(self, key: str, entry: OutboxEntry, etag: str, next_attempt_at: float) -> bool:
        """Claim an entry's next send (compare-and-set); ``False`` if another worker did."""
        claimed = replace(entry, attempts=entry.attempts + 1, next_attempt_at=next_attempt_at)
        try:
            self.storage.put_json(key, claimed.to_json(), if_match=etag)
        except PreconditionFailedError:
            return False
        return True

    def drop_outbox(self, key: str, etag: str) -> bool:
        """Delete an expired entry if it is still the version ``etag``."""
        return self.storage.delete_key(key, if_match=etag)
