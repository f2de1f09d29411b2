"""The object store's clock, read from the ``Date`` header of its answers.

Leases and the outbox's schedule are judged against times another machine wrote, so every worker
must read them on one clock. The store's is the one they share: each answer of S3 (AWS, MinIO,
moto...) carries a ``Date`` header (RFC 7231, one-second resolution). :class:`StoreClock` keeps
the offset between that and this machine's wall clock, measured on every answer, so a worker
whose own clock runs minutes ahead or behind still reads the store's time. Before the first
answer it reads the wall clock.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["StoreClock"]


class StoreClock:
    """Seconds since the epoch on the store's clock (call it like ``time.time``).

    Args:
        wall: This machine's wall clock (replaceable: a test's clock that runs ahead).
    """

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._offset = 0.0
        self._synced = False
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._wall() + self._offset

    @property
    def synced(self) -> bool:
        """Whether an answer of the store has set the offset yet."""
        with self._lock:
            return self._synced

    @property
    def offset_s(self) -> float:
        """Store time minus wall time, as last measured."""
        with self._lock:
            return self._offset

    def observe(self, date_header: str | None, received_at: float | None = None) -> None:
        """Take the store's time from an answer's ``Date`` header (ignored when unreadable).

        The header has whole seconds: the store's time at the answer lies in ``[D, D + 1)``, so
        its middle is used.
        """
        if not date_header:
            return
        try:
            stamp = email.utils.parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        wall = self._wall() if received_at is None else received_at
        with self._lock:
            self._offset = stamp + 0.5 - wall
            self._synced = True

    def attach(self, client: Any) -> None:
        """Observe every answer of a boto3 S3 client (botocore's ``after-call`` event)."""
        client.meta.events.register("after-call.s3", self._after_call)

    def _after_call(self, http_response: Any = None, **_: Any) -> None:
        headers = getattr(http_response, "headers", None) or {}
        self.observe(headers.get("Date") or headers.get("date"))
