"""Webhooks sent from a daemon thread, so that the training loop never waits on the network."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Self

from lightning_lora.clients.background import LatestOnlyWorker
from lightning_lora.clients.contract import (
    COMPLETE_PATH,
    FAILED_PATH,
    PROGRESS_PATH,
    complete_payload,
    failed_payload,
    progress_payload,
)
from lightning_lora.clients.redaction import redact
from lightning_lora.clients.webhook_client import WebhookClient, new_event_id

__all__ = ["SenderStats", "WebhookSender"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SenderStats:
    """Counters of a :class:`WebhookSender` (a snapshot when read from ``stats``)."""

    progress_posted: int = 0
    progress_replaced: int = 0
    progress_sent: int = 0
    progress_failed: int = 0
    progress_dropped: int = 0
    reliable_posted: int = 0
    reliable_sent: int = 0
    reliable_failed: int = 0
    rejected_after_close: int = 0


@dataclasses.dataclass(frozen=True)
class _Job:
    kind: str  # "progress", "complete" or "failed"
    method: str
    path: str
    payload: dict[str, Any]
    event_id: str = dataclasses.field(default_factory=new_event_id)
    timestamp: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def reliable(self) -> bool:
        return self.kind != "progress"


class WebhookSender:
    """Sends webhooks from a daemon thread so callers never wait on the network.

    Progress reports are coalesced: only the latest one not yet sent is kept. Completion and
    failure reports are queued and sent in order, each after any progress posted before it, and
    are never replaced; they are still sent after :meth:`close` times out. The thread and both
    rules are :class:`~lightning_lora.clients.background.LatestOnlyWorker`'s. All methods are
    thread-safe.

    Args:
        client: The client that makes the calls; the sender owns it (:meth:`close` closes it).
        name: Name of the background thread.
    """

    def __init__(self, client: WebhookClient, name: str = "webhook-sender") -> None:
        self.client = client
        self._lock = threading.Lock()
        self._stats = SenderStats()
        self._worker: LatestOnlyWorker[_Job] = LatestOnlyWorker(
            self._send, name, drain_on_close=True
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(client={self.client!r}, closed={self._worker.closed})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stats(self) -> SenderStats:
        """A snapshot of the counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    @property
    def is_alive(self) -> bool:
        """Whether the background thread is running."""
        return self._worker.is_alive

    # ----------------------------------------------------------------- posting

    def post_progress(
        self,
        style_id: int,
        current_epoch: int,
        total_epochs: int,
        progress_percent: int,
        estimated_seconds: int,
    ) -> bool:
        """Queue a progress report, replacing any not yet sent; returns at once, never raises.

        Returns:
            Whether it was accepted (``False`` once closed or for invalid arguments).
        """
        try:
            payload = progress_payload(
                style_id, current_epoch, total_epochs, progress_percent, estimated_seconds
            )
        except Exception as exc:
            logger.warning("progress report ignored: %s", redact(repr(exc)))
            return False
        accepted, replaced = self._worker.offer_latest(
            _Job("progress", "PATCH", PROGRESS_PATH, payload)
        )
        with self._lock:
            if not accepted:
                self._stats.rejected_after_close += 1
                return False
            self._stats.progress_replaced += replaced is not None
            self._stats.progress_posted += 1
        return True

    def post_complete(self, style_id: int, model_url: str, metadata: Mapping[str, Any]) -> bool:
        """Queue a completion report (sent with retries, never dropped).

        Returns:
            Whether it was accepted (``False`` once closed).

        Raises:
            TypeError, ValueError: The arguments cannot form a valid payload.
        """
        payload = complete_payload(style_id, model_url, metadata)
        return self._post_reliable(_Job("complete", "POST", COMPLETE_PATH, payload))

    def post_failed(self, style_id: int, error_message: str, error_code: str) -> bool:
        """Queue a failure report (sent with retries, never dropped).

        Returns:
            Whether it was accepted (``False`` once closed).

        Raises:
            TypeError: ``style_id`` is not an int.
        """
        payload = failed_payload(style_id, error_message, error_code, self.client.secrets())
        return self._post_reliable(_Job("failed", "POST", FAILED_PATH, payload))

    def _post_reliable(self, job: _Job) -> bool:
        accepted = self._worker.put(job)  # an unsent progress report goes ahead of it
        with self._lock:
            if not accepted:
                self._stats.rejected_after_close += 1
            else:
                self._stats.reliable_posted += 1
        if not accepted:
            logger.error(
                "webhook sender closed: %s report for style %s not sent",
                job.kind,
                job.payload["style_id"],
            )
        return accepted

    # ----------------------------------------------------------------- flushing

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything posted so far has been sent or given up.

        Args:
            timeout_s: Most seconds to wait; ``None`` waits without limit.

        Returns:
            Whether the sender became idle in time.
        """
        return self._worker.flush(timeout_s)

    def finish(self, timeout_s: float | None = None) -> bool:
        """Drop a progress report still waiting, then wait for the rest to be sent or given up.

        At a job's end a waiting progress report is stale (the job's end follows it), and
        waiting for a slow backend to take it would hold the next job. The one being sent is
        bounded by the client's per-attempt deadline; completions and failures queued here (not
        the worker's, which it sends itself) are waited for.

        Returns:
            Whether the sender became idle within ``timeout_s``.
        """
        if self._worker.discard_latest() is not None:
            with self._lock:
                self._stats.progress_dropped += 1
        return self._worker.flush(timeout_s)

    def close(self, timeout_s: float | None = 30.0) -> bool:
        """Drop a waiting progress report, send the rest, stop the thread, close the client.

        Later posts are rejected.

        Args:
            timeout_s: Most seconds to wait for the flush and the thread.

        Returns:
            Whether everything was sent (or given up) and the thread stopped in time.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self._worker.discard_latest() is not None:
            with self._lock:
                self._stats.progress_dropped += 1
        unsent = self._worker.waiting()
        flushed, _ = self._worker.close(timeout_s)
        if not flushed:
            logger.error(
                "webhook sender closed with %d report(s) still unsent",
                max(unsent, self._worker.waiting()),
            )
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        stopped = self._worker.join(remaining)
        self.client.close()  # the sender owns its client: its HTTP connections go with it
        return stopped and flushed

    # ----------------------------------------------------------------- thread

    def _send(self, job: _Job) -> None:
        ok = False
        try:
            ok = self.client.send(
                job.method,
                job.path,
                job.payload,
                retry=job.reliable,
                event_id=job.event_id,
                timestamp=job.timestamp,
            )
        except Exception as exc:
            logger.error("webhook %s failed unexpectedly: %s", job.kind, redact(repr(exc)))
        with self._lock:
            self._count(job, ok)

    def _count(self, job: _Job, ok: bool) -> None:
        if job.reliable:
            if ok:
                self._stats.reliable_sent += 1
            else:
                self._stats.reliable_failed += 1
        elif ok:
            self._stats.progress_sent += 1
        else:
            self._stats.progress_failed += 1
