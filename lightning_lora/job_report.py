"""One job's reports to the backend, and the one place that enforces "exactly one terminal".

A :class:`JobReport` is what every part of a job reports through: the webhook callback (progress,
and a failure raised inside ``fit``), :func:`lightning_lora.reporting.run_reported_training`
(the completion after the upload, a failure outside ``fit``) and the worker (download failures,
poison messages). Its :meth:`JobReport.complete` and :meth:`JobReport.fail` let one terminal
report through per job, whoever calls first; later calls return ``False``.

Where a terminal report goes is the report's :class:`TerminalSink`:

* :class:`SenderSink` (default): the in-process :class:`WebhookSender` queue (notebooks, CLI);
* the worker's durable sink (:class:`lightning_lora.worker.outbox.DurableSink`): the outcome
  is created once in S3 across all workers, kept in an outbox until the backend answers 2xx.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_payloads import complete_payload, failed_payload
from lightning_lora.clients.webhook_sender import WebhookSender
from lightning_lora.errors import (
    JobInterrupted,
    LightningLoraError,
    StorageUnavailableError,
    error_code_of,
)
from lightning_lora.redaction import redact

__all__ = ["JobReport", "SenderSink", "TerminalSink", "error_message_of"]

log = logging.getLogger(__name__)

_MAX_FOREIGN_MESSAGE_CHARS = 300
_CONFIG_MODULES = ("omegaconf", "hydra", "antlr4")


def _project_error(exc: BaseException) -> LightningLoraError | None:
    """The first :class:`LightningLoraError` in ``exc``'s cause chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, LightningLoraError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def error_message_of(exc: BaseException) -> str:
    """The backend's ``error_message`` for an exception: what went wrong, never internals.

    Our own errors carry messages written for the backend (naming the field or the S3 URL).
    A configuration error (OmegaConf/Hydra) is reported without its text, which may quote
    config keys and values. Any other exception gives its type and the first line of its
    message, cut short. Secrets are masked in every case.

    Args:
        exc: The exception.
    """
    own = _project_error(exc)
    if own is not None:
        text = str(own).strip()
        return redact(text or type(own).__name__)
    if type(exc).__module__.split(".")[0] in _CONFIG_MODULES:
        return "the worker's training configuration is invalid (details in the worker log)"
    first = (str(exc).strip().splitlines() or [""])[0][:_MAX_FOREIGN_MESSAGE_CHARS]
    name = type(exc).__name__
    return redact(f"{name}: {first}" if first else name)


class TerminalSink(Protocol):
    """Where a job's single terminal report goes."""

    def complete(self, style_id: int, model_url: str, metadata: Mapping[str, Any]) -> bool:
        """Report the completion; ``False`` if it was not taken (e.g. already reported)."""
        ...

    def failed(self, style_id: int, error_message: str, error_code: str) -> bool:
        """Report the failure; ``False`` if it was not taken (e.g. already reported)."""
        ...


class SenderSink:
    """Terminal reports through an in-process :class:`WebhookSender` (retried, not durable)."""

    def __init__(self, sender: WebhookSender) -> None:
        """Send through ``sender``."""
        self.sender = sender

    def complete(self, style_id: int, model_url: str, metadata: Mapping[str, Any]) -> bool:
        return self.sender.post_complete(style_id, model_url, metadata)

    def failed(self, style_id: int, error_message: str, error_code: str) -> bool:
        return self.sender.post_failed(style_id, error_message, error_code)


class JobReport:
    """A job's progress and its one terminal report.

    Args:
        sender: Sends progress reports (latest only, from a background thread).
        style_id: The style being trained.
        terminal: Where the terminal report goes; :class:`SenderSink` over ``sender`` if ``None``.
        rewrite: Applied to a failure's message before it is sent, e.g. to name the S3 URL the
            backend knows instead of the worker's local path.

    Attributes:
        terminal_kind: ``"complete"`` or ``"failed"`` once a terminal report was taken.
    """

    def __init__(
        self,
        sender: WebhookSender | WebhookClient,
        style_id: int,
        terminal: TerminalSink | None = None,
        rewrite: Callable[[str], str] | None = None,
    ) -> None:
        if isinstance(style_id, bool) or not isinstance(style_id, int):
            raise TypeError(f"style_id must be an int, got {type(style_id).__name__}")
        self.sender = sender if isinstance(sender, WebhookSender) else WebhookSender(sender)
        self.style_id = style_id
        self.sink: TerminalSink = terminal if terminal is not None else SenderSink(self.sender)
        self.rewrite = rewrite
        self.terminal_kind: str | None = None
        self._lock = threading.Lock()

    def progress(
        self, current_epoch: int, total_epochs: int, percent: int, estimated_seconds: int
    ) -> bool:
        """Queue a progress report unless the job already reported its end."""
        if self.terminal_kind is not None:
            return False
        return self.sender.post_progress(
            self.style_id, current_epoch, total_epochs, percent, estimated_seconds
        )

    def _claim(self, kind: str) -> bool:
        with self._lock:
            if self.terminal_kind is not None:
                log.warning(
                    "%s of style %s not reported: %s already reported",
                    kind,
                    self.style_id,
                    self.terminal_kind,
                )
                return False
            self.terminal_kind = kind
            return True

    def complete(self, model_url: str, metadata: Mapping[str, Any]) -> bool:
        """Report the completion, unless a terminal report was already taken.

        Raises:
            TypeError, ValueError: The arguments cannot form a valid payload (nothing is marked
                as reported, so a failure can still be reported).
        """
        complete_payload(self.style_id, model_url, metadata)  # validate before claiming
        if not self._claim("complete"):
            return False
        try:
            return self.sink.complete(self.style_id, model_url, metadata)
        except BaseException:
            with self._lock:
                self.terminal_kind = None
            raise

    def fail(self, exc: BaseException, code: str | None = None) -> bool:
        """Report a failure for ``exc``, unless a terminal report was already taken.

        A :class:`~lightning_lora.errors.JobInterrupted` (a shutdown) or a
        :class:`~lightning_lora.errors.StorageUnavailableError` (S3 down for the whole retry
        budget) is not the job's failure: the job is requeued, nothing is reported. Never raises.

        Args:
            exc: What made the job fail.
            code: The failure code; :func:`~lightning_lora.errors.error_code_of` if ``None``.

        Returns:
            Whether a failure report was taken now.
        """
        if isinstance(_project_error(exc), JobInterrupted | StorageUnavailableError):
            return False
        if not self._claim("failed"):
            return False
        code = code or error_code_of(exc)
        try:
            secrets = getattr(self.sender.client, "_secrets", tuple)()
            text = error_message_of(exc)
            if self.rewrite is not None:
                text = self.rewrite(text)
            message = failed_payload(self.style_id, text, code, secrets)
            log.error(
                "job of style %s failed (%s): %s", self.style_id, code, message["error_message"]
            )
            return self.sink.failed(self.style_id, message["error_message"], code)
        except Exception as post_exc:  # never mask the job's own exception
            log.error("failure report not taken: %s", redact(repr(post_exc)))
            return False
