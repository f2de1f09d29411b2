"""Terminal webhooks that reach the backend even when it is down for hours.

:class:`DurableSink` is the worker's :class:`~lightning_lora.jobs.report.TerminalSink`: a job's
completion or failure is first created once in S3 (:meth:`Ledger.create_outcome`, so across all
workers only one is ever sent for a run), then sent at once. If the backend does not answer 2xx
within the client's budget, the event stays in ``outbox/``. Every worker runs an
:class:`Outbox` thread that re-sends due entries with growing backoff (seconds, then minutes,
then hours; :func:`outbox_delay`) for ``window_s`` (24 h by default), always as the same event
(same ``Idempotency-Key``, ``webhook-id`` and ``webhook-timestamp``), never retraining. Past the
window the job's message goes to the dead-letter queue with a log line naming it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from lightning_lora.clients.backoff import backoff_delay
from lightning_lora.clients.contract import complete_payload
from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_sender import WebhookSender
from lightning_lora.worker.ledger import Ledger
from lightning_lora.worker.messages import webhook_allowed
from lightning_lora.worker.records import OutboxEntry, RunRef, TerminalEvent, TerminalKind

__all__ = ["DeadLetter", "DurableSink", "Outbox", "outbox_delay", "send_event"]

log = logging.getLogger(__name__)

DeadLetter = Callable[[bytes, Mapping[str, Any]], None]
"""Publishes a message body to the dead-letter queue with the given headers."""


def outbox_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before the ``attempt``-th re-send (0-based): ``base * 3**attempt``, jittered.

    With the defaults (5 s, 2 h): 5 s, 15 s, 45 s, 2 min, 7 min, 20 min, 1 h, then every 2 h;
    each delay is drawn uniformly in ``[d/2, d]`` so workers don't re-send in lockstep.
    """
    return backoff_delay(attempt, base_s, max_s, factor=3.0, low=0.5)


def send_event(client: WebhookClient, event: TerminalEvent, *, retry: bool) -> bool:
    """Send a stored event as itself (same id and timestamp)."""
    return client.send(
        event.method,
        event.path,
        event.payload,
        retry=retry,
        event_id=event.event_id,
        timestamp=event.timestamp,
    )


class DurableSink:
    """Terminal reports of one run: created once in S3, sent, kept in the outbox until 2xx.

    Args:
        ledger: The fleet's ledger.
        run: The run being reported.
        webhook_url: The job's backend URL (allow-listed).
        client: The HTTP client for the first delivery (its budget bounds the wait); the sink
            owns it and closes it in :meth:`close`.
        body: The job's message body.
        sender: The job's progress sender, flushed first so progress never follows the end.
        on_pending: Called with the run when the first delivery failed (metrics).
    """

    def __init__(
        self,
        ledger: Ledger,
        run: RunRef,
        webhook_url: str,
        client: WebhookClient,
        body: bytes,
        sender: WebhookSender | None = None,
        on_pending: Callable[[RunRef], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.run = run
        self.webhook_url = webhook_url
        self.client = client
        self.body = body
        self.sender = sender
        self.on_pending = on_pending
        self.delivered: bool | None = None

    def complete(self, style_id: int, model_url: str, metadata: Mapping[str, Any]) -> bool:
        return self._report("complete", complete_payload(style_id, model_url, metadata))

    def failed(self, style_id: int, error_message: str, error_code: str) -> bool:
        payload = {"style_id": style_id, "error_message": error_message, "error_code": error_code}
        return self._report("failed", payload)

    def close(self) -> None:
        """Close the client of the first delivery."""
        self.client.close()

    def _report(self, kind: TerminalKind, payload: dict[str, Any]) -> bool:
        if self.sender is not None:
            self.sender.flush(self.client.timeout_s)
        event = self.ledger.new_event(self.run, kind, payload, self.webhook_url, self.body)
        # the first delivery's whole budget: the outbox must not send it meanwhile
        hold_s = self.client.max_total_s + self.client.timeout_s + 5.0
        try:
            created = self.ledger.create_outcome(self.run, event, hold_s=hold_s)
        except Exception as exc:
            if kind == "complete":
                raise  # S3 down: the LoRA is kept, the job requeued; else reported as failed
            # A failure must still be heard: send it directly, without the outbox.
            log.error(
                "run %s: outcome not recorded (%s); sending the failure without the outbox",
                self.run.run_id,
                type(exc).__name__,
            )
            self.delivered = send_event(self.client, event, retry=True)
            return self.delivered
        if not created:
            log.warning(
                "run %s already has an outcome (another worker reported it): not reporting",
                self.run.run_id,
            )
            return False
        self.delivered = send_event(self.client, event, retry=True)
        if self.delivered:
            try:
                self.ledger.mark_delivered(self.run)
            except Exception as exc:  # the outbox re-sends it: same event, deduplicated
                log.warning("run %s: delivery not recorded: %s", self.run.run_id, exc)
        else:
            log.error(
                "run %s: %s webhook not acknowledged yet; kept in the outbox and re-sent",
                self.run.run_id,
                kind,
            )
            try:
                self.ledger.hand_to_outbox(self.run)
            except Exception as exc:  # the hold ends by itself
                log.warning("run %s: outbox entry not released: %s", self.run.run_id, exc)
            if self.on_pending is not None:
                self.on_pending(self.run)
        return True


class Outbox:
    """Re-sends pending terminal webhooks of the whole fleet (any worker may send any entry).

    Args:
        ledger: The ledger (the outbox's entries and the outcomes they deliver).
        client_factory: Makes the HTTP client for a webhook URL.
        allowlist: The webhook allowlist (an entry whose URL left it is not sent; it stays until
            its window ends).
        window_s: How long an event is re-sent before its job is dead-lettered.
        poll_s: Seconds between two scans of the outbox.
        backoff_base_s: First re-send delay (see :func:`outbox_delay`).
        backoff_max_s: Largest re-send delay.
        dead_letter: Publishes a job's body to the dead-letter queue (past the window).
    """

    def __init__(
        self,
        ledger: Ledger,
        client_factory: Callable[[str], WebhookClient],
        allowlist: list[str],
        *,
        window_s: float = 86_400.0,
        poll_s: float = 10.0,
        backoff_base_s: float = 5.0,
        backoff_max_s: float = 7_200.0,
        dead_letter: DeadLetter | None = None,
    ) -> None:
        self.ledger = ledger
        self.client_factory = client_factory
        self.allowlist = list(allowlist)
        self.window_s = float(window_s)
        self.poll_s = float(poll_s)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.dead_letter = dead_letter
        self.pending = 0
        self.on_scan: Callable[[int], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Scan every ``poll_s`` seconds in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop scanning."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # S3 down: try again next round
                log.warning("outbox scan failed: %s", exc)
            self._stop.wait(self.poll_s)

    def run_once(self) -> int:
        """Send every due entry once; return how many were sent successfully."""
        keys = self.ledger.outbox_keys()
        self.pending = len(keys)
        if self.on_scan is not None:
            self.on_scan(self.pending)
        delivered = 0
        for key in keys:
            if self._stop.is_set():
                break
            try:
                delivered += self.attempt(key)
            except Exception as exc:
                log.warning("outbox entry %s: %s", key, exc)
        return delivered

    def attempt(self, key: str, *, force: bool = False) -> bool:
        """Try one entry if due (or ``force``): claim it, send it once, record the result.

        Returns:
            Whether the backend acknowledged it now.
        """
        found = self.ledger.outbox_entry(key)
        if found is None:
            return False
        entry, etag = found
        now = self.ledger.clock()
        if not force and entry.next_attempt_at > now:
            return False
        run = entry.run
        if now - entry.created_at > self.window_s:
            self._expire(key, etag, entry)
            return False
        url = entry.event.webhook_url
        if not webhook_allowed(url, self.allowlist):
            log.error("outbox entry of run %s: its webhook_url left the allowlist", run.run_id)
            return False
        due = now + outbox_delay(entry.attempts, self.backoff_base_s, self.backoff_max_s)
        if not self.ledger.claim_outbox(key, entry, etag, next_attempt_at=due):
            return False  # another worker is sending it
        client = self.client_factory(url)
        try:
            ok = send_event(client, entry.event, retry=False)
        finally:
            client.close()
        if ok:
            self.ledger.mark_delivered(run)
            log.info(
                "outbox: %s webhook of run %s delivered (attempt %d)",
                entry.event.kind,
                run.run_id,
                entry.attempts + 1,
            )
        return ok

    def _expire(self, key: str, etag: str, entry: OutboxEntry) -> None:
        run = entry.run
        reason = (
            f"its {entry.event.kind} webhook was not acknowledged by the backend within "
            f"{self.window_s:.0f}s ({entry.attempts} attempts)"
        )
        if self.dead_letter is not None:
            self.dead_letter(
                entry.event.body,
                {
                    "x-lightning-lora-reason": reason,
                    "x-lightning-lora-run-id": run.run_id,
                    "x-lightning-lora-event-id": entry.event.event_id,
                },
            )
        if self.ledger.drop_outbox(key, etag):
            log.error(
                "job %s (style %s, run %s) dead-lettered: %s",
                run.job_key,
                run.style_id,
                run.run_id,
                reason,
            )
