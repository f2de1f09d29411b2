"""Cancelling a style's job: the backend's message, the barrier, and the watch on a running job.

The backend's side (README, "Cancelling a job"): one persistent message ``{"style_id": N}`` on
the plain durable queue ``<queue>.cancel`` (``model_training.cancel``), declared exactly as the
work queue is::

    channel.queue_declare(queue="model_training.cancel", durable=True)
    channel.basic_publish(exchange="", routing_key="model_training.cancel",
                          body=json.dumps({"style_id": 42}),
                          properties=pika.BasicProperties(delivery_mode=2))

The worker's side:

1. One worker takes the cancel (every worker consumes the cancel queue; at each connect the
   waiting cancels are handled before the first job). It opens the style's cancel record in the
   bucket (:meth:`~lightning_lora.worker.ledger.Ledger.open_cancel`) and publishes a *barrier*
   to the work queue (:func:`barrier`), confirmed by the broker, before it acks the cancel.
2. Every job of the style that begins while the record is open, or that began before it
   closed, is cancelled: a job taken from the queue is reported ``CANCELLED`` and acked without
   training; a running job sees the record within ``worker.cancel_poll_s`` (:class:`CancelWatch`)
   and stops at the next step (:class:`~lightning_lora.worker.job_callbacks.StopOnCancel`). Either
   way its checkpoints are deleted and its one terminal webhook is ``failed``/``CANCELLED``.
3. The barrier sits behind every job queued before the cancel. The worker that takes it closes
   the record (:meth:`~lightning_lora.worker.ledger.Ledger.close_cancel`) and acks it: jobs
   published after the cancel come out after the barrier, so they train (a retrain of the style
   is not cancelled by an old cancel).

What is not cancelled: a job with an outcome (a cancel after the completion changes nothing);
a job published in the moment between the backend's cancel and the worker's barrier is
cancelled with the ones before it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from lightning_lora.clients.contract import style_id_problem
from lightning_lora.errors import InvalidMessageError
from lightning_lora.worker.ledger import Ledger
from lightning_lora.worker.records import RunRef

__all__ = ["BARRIER_HEADER", "CancelWatch", "barrier", "barrier_of", "parse_cancel"]

log = logging.getLogger(__name__)

BARRIER_HEADER = "x-lightning-lora-cancel-barrier"
"""Header of a barrier message on the work queue: the cancel id it closes."""

_MAX_CANCEL_BYTES = 4096


def parse_cancel(body: bytes) -> int:
    """The style id of a cancel message (``{"style_id": N}``; other fields are ignored).

    Raises:
        InvalidMessageError: Naming what is wrong (the body or the field ``style_id``).
    """
    if len(body) > _MAX_CANCEL_BYTES:
        raise InvalidMessageError(f"cancel message of {len(body)} bytes (at most 4096)")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidMessageError(f"cancel message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidMessageError("cancel message must be a JSON object with 'style_id'")
    style_id = data.get("style_id")
    problem = style_id_problem(style_id)
    if problem is not None:
        raise InvalidMessageError(f"field 'style_id': {problem}")
    assert isinstance(style_id, int)
    return style_id


def barrier(style_id: int, cancel_id: str) -> tuple[bytes, dict[str, Any]]:
    """The barrier of a cancel: a work-queue message (body, headers) that closes it."""
    body = json.dumps({"style_id": style_id, "cancel_id": cancel_id}).encode("utf-8")
    return body, {BARRIER_HEADER: cancel_id}


def barrier_of(headers: Mapping[str, Any], body: bytes) -> tuple[int, str] | None:
    """``(style_id, cancel_id)`` of a barrier, or ``None`` for any other message.

    Raises:
        InvalidMessageError: The message has the barrier header but not a barrier's body.
    """
    cancel_id = headers.get(BARRIER_HEADER)
    if cancel_id is None:
        return None
    style_id = parse_cancel(body)
    if isinstance(cancel_id, bytes):
        cancel_id = cancel_id.decode("utf-8", "replace")
    if not isinstance(cancel_id, str) or not cancel_id:
        raise InvalidMessageError(f"header {BARRIER_HEADER!r} is not a cancel id")
    return style_id, cancel_id


class CancelWatch:
    """Looks at the run's cancel record every ``poll_s`` seconds while the job runs.

    A context manager: the thread starts on entry and is joined on exit (nothing outlives the
    job). :attr:`cancelled` is set once the style's cancel stops the run; a failed look (the
    store is down) is logged and tried again at the next interval.

    Args:
        ledger: The bucket's ledger.
        run: The running job's run.
        poll_s: Seconds between two looks.
    """

    def __init__(self, ledger: Ledger, run: RunRef, poll_s: float) -> None:
        self.ledger = ledger
        self.run = run
        self.poll_s = poll_s
        self.cancelled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"cancel-watch-{run.run_id}", daemon=True
        )

    def __enter__(self) -> CancelWatch:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def look(self) -> bool:
        """Look once now; returns whether the run is cancelled."""
        if self.ledger.cancel_stopping(self.run) is not None:
            if not self.cancelled.is_set():
                log.warning("run %s: its style was cancelled; stopping", self.run.run_id)
            self.cancelled.set()
        return self.cancelled.is_set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self.look():
                    return
            except Exception as exc:  # a store blip: look again at the next interval
                log.warning("run %s: cancel record not read: %s", self.run.run_id, exc)
