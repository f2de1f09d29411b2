"""One job's reports to the backend: its progress, and the one object that sends its end.

A :class:`JobReport` is what a job reports through. The progress callback
(:class:`~lightning_lora.callbacks.progress.ProgressCallback`) hands it progress; the runner
(:func:`~lightning_lora.jobs.runner.run_reported_training`) and the worker hand it the job's end:
:meth:`JobReport.complete` after the upload, :meth:`JobReport.fail` for an exception anywhere.
Whether an exception is a failure at all is :func:`~lightning_lora.errors.disposition_of`'s
decision (a shutdown or S3 being down requeues the job and reports nothing). One terminal report
goes through per job, whoever calls first; later calls return ``False``.

Where a terminal report goes is the report's :class:`TerminalSink`:

* :class:`SenderSink` (default): the in-process :class:`WebhookSender` queue (notebooks, CLI);
* the worker's durable sink (:class:`lightning_lora.worker.outbox.DurableSink`): the outcome
  is created once in S3 across all workers, kept in an outbox until the backend answers 2xx.

A report owns its sender (and the sender's client) and its sink: close it (:meth:`JobReport.close`,
or ``with``) when the job is settled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, Self

from omegaconf import DictConfig

from lightning_lora.clients.contract import check_style_id, complete_payload, failed_payload
from lightning_lora.clients.redaction import redact
from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_sender import WebhookSender
from lightning_lora.config import partial_at
from lightning_lora.errors import disposition_of, project_error

__all__ = ["JobReport", "SenderSink", "TerminalSink", "error_message_of", "webhook_client"]

log = logging.getLogger(__name__)

_MAX_FOREIGN_MESSAGE_CHARS = 300
_CONFIG_MODULES = ("omegaconf", "hydra", "antlr4")


def webhook_client(
    webhook_url: str,
    cfg: DictConfig | None = None,
    *,
    token: str | None = None,
    signing_secret: str | None = None,
) -> WebhookClient:
    """A client for a job's ``webhook_url``, built from ``cfg.reporting.client``.

    The one place a webhook client is made from the config (timeouts, attempts, budget); the
    runner, the worker and its outbox all call it.

    Args:
        webhook_url: The backend base URL (already allow-listed by the worker).
        cfg: The training config; the client's defaults without one (or without the node).
        token: Bearer token; ``INTERNAL_API_TOKEN`` is read at each call when ``None``.
        signing_secret: ``WEBHOOK_SIGNING_SECRET``; read at each call when ``None``.

    Returns:
        A new client; its owner closes it.
    """
    factory = partial_at(cfg, "reporting.client", WebhookClient)
    return factory(webhook_url, token=token, signing_secret=signing_secret)


def error_message_of(exc: BaseException) -> str:
    """The backend's ``error_message`` for an exception: what went wrong, never internals.

    Our own errors carry messages written for the backend (naming the field or the S3 URL).
    A configuration error (OmegaConf/Hydra) is reported without its text, which may quote
    config keys and values. Any other exception gives its type and the first line of its
    message, cut short. Secrets are masked in every case.

    Args:
        exc: The exception.
    """
    own = project_error(exc)
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

    def close(self) -> None:
        """Release what the sink holds (its HTTP client)."""
        ...


class SenderSink:
    """Terminal reports through an in-process :class:`WebhookSender` (retried, not durable)."""

    def __init__(self, sender: WebhookSender) -> None:
        """Send through ``sender`` (owned by the report, not by this sink)."""
        self.sender = sender

    def complete(self, style_id: int, model_url: str, metadata: Mapping[str, Any]) -> bool:
        return self.sender.post_complete(style_id, model_url, metadata)

    def failed(self, style_id: int, error_message: str, error_code: str) -> bool:
        return self.sender.post_failed(style_id, error_message, error_code)

    def close(self) -> None:
        """Nothing of its own to release."""


class JobReport:
    """A job's progress and its one terminal report.

    Args:
        sender: Sends progress reports (latest only, from a background thread); a
            :class:`WebhookClient` is wrapped in a sender. The report owns the sender (and so
            its client) and closes it in :meth:`close`.
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
        self.style_id = check_style_id(style_id)
        self.sender = sender if isinstance(sender, WebhookSender) else WebhookSender(sender)
        self.sink: TerminalSink = terminal if terminal is not None else SenderSink(self.sender)
        self.rewrite = rewrite
        self.terminal_kind: str | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, timeout_s: float | None = 30.0) -> bool:
        """Send what is queued (within ``timeout_s``), stop the sender, release the sink.

        Returns:
            Whether everything queued was sent (or given up) in time.
        """
        done = self.sender.close(timeout_s)  # and its client
        self.sink.close()
        return done

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

    def fail(self, exc: BaseException) -> bool:
        """Report ``exc`` as the job's failure, if it is one and nothing was reported yet.

        :func:`~lightning_lora.errors.disposition_of` decides: an exception that requeues the job
        (a shutdown, S3 down for the whole retry budget, or an error raised while handling one of
        those) reports nothing. Never raises.

        Args:
            exc: What ended the job.

        Returns:
            Whether a failure report was taken now.
        """
        disposition = disposition_of(exc)
        if disposition.requeue or disposition.error_code is None:
            return False
        if not self._claim("failed"):
            return False
        code = disposition.error_code
        try:
            text = error_message_of(exc)
            if self.rewrite is not None:
                text = self.rewrite(text)
            message = failed_payload(self.style_id, text, code, self.sender.client.secrets())
            log.error(
                "job of style %s failed (%s): %s", self.style_id, code, message["error_message"]
            )
            return self.sink.failed(self.style_id, message["error_message"], code)
        except Exception as post_exc:  # never mask the job's own exception
            log.error("failure report not taken: %s", redact(repr(post_exc)))
            return False
