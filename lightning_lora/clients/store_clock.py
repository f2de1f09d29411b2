"""The object store's clock, read from the ``Date`` header of its answers.

Leases and the outbox's schedule are judged against times another machine wrote, so every worker
must read them on one clock. The store's is the one they share: each answer of S3 (AWS, MinIO,
moto...) carries a ``Date`` header (RFC 7231, whole seconds). :class:`StoreClock` keeps the offset
between that and this machine's wall clock, so a worker whose own clock runs minutes ahead or
behind still reads the store's time. Before the first answer it reads the wall clock.

One header tells the offset to within a second: the store's time when it answered lay in
``[D, D + 1)``, and it answered between the request's send (wall ``w0``) and its answer (``w1``),
so ``offset`` lies in ``[D - w1, D + 1 - w0]``. The clock intersects these intervals over its
answers (their seconds fall at different phases) and reads the middle, which settles within the
round trip's length after a few answers and then stays put: two readings differ as the wall clock
does. An answer outside the interval (the wall clock was stepped) starts it afresh, and so does
an interval older than :data:`RESET_AFTER_S`, so a slow drift is followed.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RESET_AFTER_S", "StoreClock"]

RESET_AFTER_S = 600.0
"""The offset's interval is rebuilt from fresh answers this often (drift of the wall clock)."""


class StoreClock:
    """Seconds since the epoch on the store's clock (call it like ``time.time``).

    Args:
        wall: This machine's wall clock (replaceable: a test's clock that runs ahead).
    """

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._low = -float("inf")
        self._high = float("inf")
        self._since = 0.0
        self._lock = threading.Lock()
        self._sent = threading.local()

    def __call__(self) -> float:
        return self._wall() + self.offset_s

    @property
    def synced(self) -> bool:
        """Whether an answer of the store has set the offset yet."""
        with self._lock:
            return self._high != float("inf")

    @property
    def offset_s(self) -> float:
        """Store time minus wall time: the middle of what the answers allow (0 before one)."""
        with self._lock:
            if self._high == float("inf"):
                return 0.0
            return (self._low + self._high) / 2

    def observe(self, date_header: str | None, sent_at: float, received_at: float) -> None:
        """Narrow the offset with an answer's ``Date`` (ignored when unreadable).

        Args:
            date_header: The answer's ``Date`` header.
            sent_at: Wall time the request was sent.
            received_at: Wall time the answer came.
        """
        if not date_header:
            return
        try:
            stamp = email.utils.parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        low, high = stamp - received_at, stamp + 1.0 - sent_at
        with self._lock:
            stale = received_at - self._since > RESET_AFTER_S
            if stale or low > self._high or high < self._low:
                self._low, self._high, self._since = low, high, received_at
            else:
                self._low, self._high = max(self._low, low), min(self._high, high)

    def attach(self, client: Any) -> None:
        """Observe every answer of a boto3 S3 client (botocore's ``before-send``/``after-call``)."""
        client.meta.events.register("before-send.s3", self._before_send)
        client.meta.events.register("after-call.s3", self._after_call)

    def _before_send(self, **_: Any) -> None:
        self._sent.at = self._wall()  # per thread: the job, the outbox and a lease share a client

    def _after_call(self, http_response: Any = None, **_: Any) -> None:
        received_at = self._wall()
        sent_at = getattr(self._sent, "at", received_at)
        headers = getattr(http_response, "headers", None) or {}
        self.observe(headers.get("Date") or headers.get("date"), sent_at, received_at)
