"""Terminal webhooks that reach the backend even when it is down for hours.

:class:`DurableSink` is the worker's :class:`~lightning_lora.job_report.TerminalSink`: a job's
completion or failure is first created once in S3 (:meth:`Ledger.create_outcome`, so across all
workers only one is ever sent for a run), then sent at once. If the backend does not answer 2xx
within the client's budget, the event stays in ``outbox/``. Every worker runs an
:class:`Outbox` thread that re-sends due entries with growing backoff (seconds, then minutes,
then hours; :func:`outbox_delay`) for ``window_s`` (24 h by default), always as the same event
(same ``Idempotency-Key``, ``webhook-id`` and ``webhook-timestamp``), never retraining. Past the
window the job's message goes to the dead-letter queue with a log line naming it.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from lightning_lora.clients.storage import S3Storage
from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_payloads import COMPLETE_PATH, FAILED_PATH, complete_payload
from lightning_lora.clients.webhook_sender import WebhookSender
from lightning_lora.errors import PreconditionFailedError
from lightning_lora.jitter import RNG
from lightning_lora.layout import OUTBOX_PREFIX
from lightning_lora.worker.ledger import Ledger, RunRef
from lightning_lora.worker.messages import webhook_allowed

__all__ = ["DurableSink", "Outbox", "outbox_delay", "terminal_event"]

log = logging.getLogger(__name__)

DeadLetter = Callable[[bytes, Mapping[str, Any]], None]
"""Publishes a message body to the dead-letter queue with the given headers."""


def outbox_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before the ``attempt``-th re-send (0-based): ``base * 3**attempt``, jittered.

    With the defaults (5 s, 2 h): 5 s, 15 s, 45 s, 2 min, 7 min, 20 min, 1 h, then every 2 h;
    each delay is drawn uniformly in ``[d/2, d]`` so workers don't re-send in lockstep.
    """
    ceiling = min(max_s, base_s * 3 ** min(max(attempt, 0), 30))
    return RNG.uniform(ceiling / 2, ceiling)


def terminal_event(
    run: RunRef,
    kind: str,
    payload: Mapping[str, Any],
    webhook_url: str,
    body: bytes,
    now: float | None = None,
) -> dict[str, Any]:
    """A terminal webhook as stored in the outcome and outbox records.

    Args:
        run: The run it ends.
        kind: ``"complete"`` or ``"failed"``.
        payload: The contract's body.
        webhook_url: The backend base URL of the job.
        body: The job's message body (dead-lettered if the event is never acknowledged).
        now: Creation time (Unix seconds), now if ``None``.
    """
    return {
        "kind": kind,
        "method": "POST",
        "path": COMPLETE_PATH if kind == "complete" else FAILED_PATH,
        "payload": dict(payload),
        "event_id": f"ll-{run.run_id}-{kind}",
        "timestamp": int(time.time() if now is None else now),
        "webhook_url": webhook_url,
        "run_id": run.run_id,
        "body_b64": base64.b64encode(body).decode("ascii"),
    }


def send_event(client: WebhookClient, event: Mapping[str, Any], *, retry: bool) -> bool:
    """Send a stored event as itself (same id and timestamp)."""
    return client.send(
        str(event["method"]),
        str(event["path"]),
        event["payload"],
        retry=retry,
        event_id=str(event["event_id"]),
        timestamp=int(event["timestamp"]),
    )


class DurableSink:
    """Terminal reports of one run: created once in S3, sent, kept in the outbox until 2xx.

    Args:
        ledger: The fleet's ledger.
        run: The run being reported.
        webhook_url: The job's backend URL (allow-listed).
        client: The HTTP client for the first delivery (its budget bounds the wait).
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

    def _report(self, kind: str, payload: dict[str, Any]) -> bool:
        if self.sender is not None:
            self.sender.flush(self.client.timeout_s)
        event = terminal_event(self.run, kind, payload, self.webhook_url, self.body)
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
        storage: The bucket.
        ledger: The ledger (marks deliveries).
        client_factory: Makes the HTTP client for a webhook URL.
        allowlist: The webhook allowlist (entries whose URL left it are dropped).
        window_s: How long an event is re-sent before its job is dead-lettered.
        poll_s: Seconds between two scans of the outbox.
        backoff_base_s: First re-send delay (see :func:`outbox_delay`).
        backoff_max_s: Largest re-send delay.
        dead_letter: Publishes a job's body to the dead-letter queue (past the window).
    """

    def __init__(
        self,
        storage: S3Storage,
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
        self.storage = storage
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
        keys = self.storage.list_keys(OUTBOX_PREFIX)
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
        found = self.storage.get_json(key)
        if found is None:
            return False
        entry, etag = found
        now = self.ledger.clock()
        if not force and float(entry.get("next_attempt_at", 0)) > now:
            return False
        run = RunRef(int(entry["style_id"]), str(entry["job_key"]), int(entry["generation"]))
        if now - float(entry.get("created_at", now)) > self.window_s:
            self._expire(key, etag, entry, run)
            return False
        url = str(entry.get("webhook_url", ""))
        if not webhook_allowed(url, self.allowlist):
            log.error("outbox entry of run %s: its webhook_url left the allowlist", run.run_id)
            return False
        attempts = int(entry.get("attempts", 0)) + 1
        claimed = {
            **entry,
            "attempts": attempts,
            "next_attempt_at": now
            + outbox_delay(attempts - 1, self.backoff_base_s, self.backoff_max_s),
        }
        try:
            self.storage.put_json(key, claimed, if_match=etag)
        except PreconditionFailedError:
            return False  # another worker is sending it
        client = self.client_factory(url)
        try:
            ok = send_event(client, entry, retry=False)
        finally:
            client.close()
        if ok:
            self.ledger.mark_delivered(run)
            log.info(
                "outbox: %s webhook of run %s delivered (attempt %d)",
                entry.get("kind"),
                run.run_id,
                attempts,
            )
        return ok

    def _expire(self, key: str, etag: str, entry: dict[str, Any], run: RunRef) -> None:
        body = base64.b64decode(str(entry.get("body_b64", "")))
        reason = (
            f"its {entry.get('kind')} webhook was not acknowledged by the backend within "
            f"{self.window_s:.0f}s ({entry.get('attempts', 0)} attempts)"
        )
        if self.dead_letter is not None:
            self.dead_letter(
                body,
                {
                    "x-lightning-lora-reason": reason,
                    "x-lightning-lora-run-id": run.run_id,
                    "x-lightning-lora-event-id": str(entry.get("event_id")),
                },
            )
        if self.storage.delete_key(key, if_match=etag):
            log.error(
                "job %s (style %s, run %s) dead-lettered: %s",
                run.job_key,
                run.style_id,
                run.run_id,
                reason,
            )
