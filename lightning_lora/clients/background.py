"""One background thread that handles items in order, keeping only the newest "latest" item.

Two parts of a training job must never make the loop wait on the network and may drop stale
work: progress webhooks (only the newest unsent report matters) and checkpoint uploads (only the
newest waiting checkpoint matters). Completion and failure webhooks, on the other hand, must be
sent in order and never dropped. :class:`LatestOnlyWorker` holds both rules once:

* :meth:`~LatestOnlyWorker.offer_latest` puts an item in a one-item slot, replacing (and
  returning) the one waiting there;
* :meth:`~LatestOnlyWorker.put` queues an item that is never replaced; a latest item waiting
  at that moment is queued ahead of it, so the order of events is kept.

Hand-written because neither the standard library nor a dependency has a queue whose newest
item replaces the waiting one (``queue.Queue(maxsize=1)`` blocks or refuses instead), and the
flush/close semantics (wait for idle with a deadline, then drop or drain) are what both callers
need.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["LatestOnlyWorker"]

T = TypeVar("T")


class LatestOnlyWorker(Generic[T]):
    """A daemon thread calling ``handle`` on one item at a time.

    Queued items (:meth:`put`) go first, in order; then the latest item (:meth:`offer_latest`).
    ``handle`` runs on the thread; an exception from it is passed to ``on_error`` and the thread
    goes on. All methods are thread-safe.

    Args:
        handle: Called with each item on the background thread.
        name: The thread's name.
        drain_on_close: After :meth:`close`, whether the thread still handles the queued items
            (reliable events) or stops after the current one, dropping what waits.
        on_error: Called with an exception ``handle`` raised (default: re-raised nowhere,
            ignored).
    """

    def __init__(
        self,
        handle: Callable[[T], None],
        name: str,
        *,
        drain_on_close: bool,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._handle = handle
        self._on_error = on_error
        self._drain_on_close = drain_on_close
        self._cond = threading.Condition()
        self._queue: collections.deque[T] = collections.deque()
        #: the latest slot: ``(item,)`` while one waits (the item itself may be ``None``)
        self._latest: tuple[T] | None = None
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        with self._cond:
            return self._closed

    @property
    def is_alive(self) -> bool:
        """Whether the background thread is running."""
        return self._thread.is_alive()

    def offer_latest(self, item: T) -> tuple[bool, T | None]:
        """Put ``item`` in the latest slot.

        Returns:
            ``(accepted, replaced)``: whether it was taken (``False`` once closed), and the item
            it replaced, if one was waiting.
        """
        with self._cond:
            if self._closed:
                return False, None
            replaced = self._latest[0] if self._latest is not None else None
            self._latest = (item,)
            self._cond.notify_all()
            return True, replaced

    def put(self, item: T) -> bool:
        """Queue ``item``, never replaced, after any latest item now waiting.

        Returns:
            Whether it was taken (``False`` once closed).
        """
        with self._cond:
            if self._closed:
                return False
            self._move_latest_to_queue()
            self._queue.append(item)
            self._cond.notify_all()
            return True

    def busy(self) -> bool:
        """Whether an item is being handled or waits."""
        with self._cond:
            return not self._idle()

    def discard_latest(self) -> T | None:
        """Drop the latest item if it is still waiting; return it (``None`` if there was none)."""
        with self._cond:
            latest, self._latest = self._latest, None
            self._cond.notify_all()
            return latest[0] if latest is not None else None

    def waiting(self) -> int:
        """How many items wait (the one being handled not counted)."""
        with self._cond:
            return len(self._queue) + (self._latest is not None)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every item taken so far was handled.

        Args:
            timeout_s: Most seconds to wait; ``None`` waits without limit.

        Returns:
            Whether the worker became idle in time.
        """
        with self._cond:
            return self._cond.wait_for(self._idle, timeout=timeout_s)

    def close(self, timeout_s: float | None) -> tuple[bool, list[T]]:
        """Wait up to ``timeout_s`` for idle, then refuse new items and let the thread stop.

        With ``drain_on_close`` the thread still handles the queued items (and then stops);
        without it, whatever waits is dropped and returned.

        Returns:
            ``(idle, dropped)``: whether everything was handled in time, and the dropped items.
        """
        with self._cond:
            idle = self._cond.wait_for(self._idle, timeout=timeout_s)
            self._closed = True
            dropped: list[T] = []
            if not self._drain_on_close:
                self._move_latest_to_queue()
                dropped = list(self._queue)
                self._queue.clear()
            self._cond.notify_all()
            return idle, dropped

    def join(self, timeout_s: float | None) -> bool:
        """Wait for the thread to stop (after :meth:`close`); returns whether it did."""
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ----------------------------------------------------------------- internals

    def _idle(self) -> bool:
        return not self._queue and self._latest is None and not self._busy

    def _move_latest_to_queue(self) -> None:
        if self._latest is not None:
            self._queue.append(self._latest[0])
            self._latest = None

    def _next(self) -> tuple[T] | None:
        """The next item, as a 1-tuple; ``None`` once closed with nothing left to handle."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed or bool(self._queue) or self._latest is not None
            )
            if self._queue:
                got: tuple[T] = (self._queue.popleft(),)
            elif self._latest is not None:
                got, self._latest = self._latest, None
            else:
                return None
            self._busy = True
            return got

    def _run(self) -> None:
        while True:
            got = self._next()
            if got is None:
                return
            (item,) = got
            try:
                self._handle(item)
            except BaseException as exc:  # the thread must outlive a bad item
                if self._on_error is not None:
                    self._on_error(exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
