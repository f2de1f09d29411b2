"""HTTP client for the platform backend's training webhooks.

Three calls, all under ``{webhook_url}/api/webhooks/training/``:

* ``PATCH progress``: ``{"style_id", "progress": {"current_epoch", "total_epochs",
  "progress_percent", "estimated_seconds"}}``, one attempt, best effort.
* ``POST complete``: ``{"style_id", "model_url", "metadata"}``, retried.
* ``POST failed``: ``{"style_id", "error_message", "error_code"}``, retried.

Every call carries ``Authorization: Bearer <INTERNAL_API_TOKEN>``,
``X-Request-Source: training-server`` and ``Content-Type: application/json`` (the contract), and
also, for deduplication and authenticity (Standard Webhooks):

* ``Idempotency-Key`` and ``webhook-id``: the event's id, the same for every retry and
  redelivery of one event (a job's terminal event id is stored with its outcome);
* ``webhook-timestamp``: the event's creation time (Unix seconds), also fixed per event;
* ``webhook-signature``: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` when
  ``WEBHOOK_SIGNING_SECRET`` is set (:func:`sign_webhook`, :func:`verify_webhook`).

The token never appears in logs, exception messages or reprs.

:class:`WebhookClient` makes the calls synchronously (payloads from
:mod:`lightning_lora.clients.contract`);
:class:`~lightning_lora.clients.webhook_sender.WebhookSender` makes them from a daemon thread so
that the training loop never waits on the network.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import http.client
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from lightning_lora.clients.backoff import backoff_delay
from lightning_lora.clients.contract import (
    COMPLETE_PATH,
    FAILED_PATH,
    PROGRESS_PATH,
    complete_payload,
    failed_payload,
    progress_payload,
)
from lightning_lora.clients.http_deadline import HttpReply, request_with_deadline
from lightning_lora.clients.redaction import redact

__all__ = [
    "SIGNING_SECRET_ENV_VAR",
    "TOKEN_ENV_VAR",
    "WebhookClient",
    "new_event_id",
    "sign_webhook",
    "verify_webhook",
]

logger = logging.getLogger(__name__)

TOKEN_ENV_VAR = "INTERNAL_API_TOKEN"
SIGNING_SECRET_ENV_VAR = "WEBHOOK_SIGNING_SECRET"
REQUEST_SOURCE = "training-server"
RETRYABLE_STATUSES = frozenset({408, 429})
_MIN_ATTEMPT_TIMEOUT_S = 0.05


# --------------------------------------------------------------------------- signatures


def _secret_bytes(secret: str) -> bytes:
    """A Standard Webhooks secret (``whsec_<base64>``) decoded, or any other string as UTF-8."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode("utf-8")


def sign_webhook(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,`` + base64 HMAC-SHA256 of ``id.ts.body``.

    Args:
        secret: ``WEBHOOK_SIGNING_SECRET`` (``whsec_<base64>`` or any string).
        event_id: The ``webhook-id``.
        timestamp: The ``webhook-timestamp``.
        body: The exact request body.
    """
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify_webhook(
    secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float | None = 300
) -> bool:
    """Check a received webhook's signature (what the backend does; used by the tests).

    Args:
        secret: The shared signing secret.
        headers: The request headers (looked up case-insensitively).
        body: The raw body.
        tolerance_s: Largest accepted age of ``webhook-timestamp`` (``None``: any age; retries
            of an old event keep its timestamp, so a backend that wants them sets ``None``).

    Returns:
        Whether one of the ``v1`` signatures matches.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    event_id, stamp = lower.get("webhook-id", ""), lower.get("webhook-timestamp", "")
    if not event_id or not stamp.isdigit():
        return False
    if tolerance_s is not None and abs(time.time() - int(stamp)) > tolerance_s:
        return False
    expected = sign_webhook(secret, event_id, int(stamp), body)
    offered = lower.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, candidate) for candidate in offered)


def new_event_id() -> str:
    """A fresh event id (progress reports; terminal events derive theirs from the run)."""
    return "evt_" + uuid.uuid4().hex


# --------------------------------------------------------------------------- client


def _retry_after_s(response: HttpReply) -> float | None:
    """Parse a ``Retry-After`` header (seconds or HTTP date) into seconds, if present."""
    value = response.header("Retry-After")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _is_retryable_status(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUSES


class WebhookClient:
    """Synchronous client for the training webhooks.

    Args:
        base_url: The job's ``webhook_url``, e.g. ``http://backend:8000``.
        token: Bearer token; when ``None`` the ``INTERNAL_API_TOKEN`` environment variable is
            read at every call. Surrounding whitespace is stripped (secret files often end in a
            newline).
        signing_secret: HMAC secret of ``webhook-signature``; ``WEBHOOK_SIGNING_SECRET`` is read
            at every call when ``None``; no signature when neither is set.
        timeout_s: Deadline of each attempt: connect, send and the whole answer (a backend
            that dribbles its answer is cut off, :mod:`~lightning_lora.clients.http_deadline`).
        max_attempts: Most attempts of a retried call (complete, failed).
        max_total_s: Most seconds a retried call may take, waits included.
        backoff_base_s: First backoff ceiling; doubles after every attempt (full jitter).
        backoff_max_s: Largest backoff ceiling, and largest ``Retry-After`` honoured.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 10.0,
        signing_secret: str | None = None,
        max_attempts: int = 6,
        max_total_s: float = 120.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError("webhook base_url must be an http:// or https:// URL")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout_s <= 0 or max_total_s <= 0:
            raise ValueError("timeout_s and max_total_s must be positive")
        self.base_url = base_url.rstrip("/")
        self._token = token.strip() if token is not None else None
        self._signing_secret = signing_secret
        self.timeout_s = float(timeout_s)
        self.max_attempts = int(max_attempts)
        self.max_total_s = float(max_total_s)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self._sleep: Callable[[float], None] = time.sleep
        self._warned_no_token = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, timeout_s={self.timeout_s}, "
            f"max_attempts={self.max_attempts}, max_total_s={self.max_total_s})"
        )

    def close(self) -> None:
        """Nothing to release: every attempt opens and closes its own connection."""

    # ----------------------------------------------------------------- public calls

    def send_progress(
        self,
        style_id: int,
        current_epoch: int,
        total_epochs: int,
        progress_percent: int,
        estimated_seconds: int,
    ) -> bool:
        """Report training progress: one attempt, never raises.

        Args:
            style_id: The style being trained.
            current_epoch: Epochs done so far.
            total_epochs: Epochs planned.
            progress_percent: Overall progress, 0..100.
            estimated_seconds: Estimated seconds left.

        Returns:
            Whether the backend answered 2xx.
        """
        try:
            payload = progress_payload(
                style_id, current_epoch, total_epochs, progress_percent, estimated_seconds
            )
            return self.send("PATCH", PROGRESS_PATH, payload, retry=False)
        except Exception as exc:
            logger.warning("progress webhook not sent: %s", redact(repr(exc)))
            return False

    def send_complete(
        self,
        style_id: int,
        model_url: str,
        metadata: Mapping[str, Any],
        event_id: str | None = None,
    ) -> bool:
        """Report a finished training, retrying transient failures.

        Args:
            style_id: The style trained.
            model_url: ``s3://bucket/key`` of the final LoRA.
            metadata: Training facts (``training_epochs``, ``lora_rank``, ``lora_alpha``...).
            event_id: The event's id, fixed across retries and redeliveries (new if ``None``).

        Returns:
            Whether the backend acknowledged it (2xx).

        Raises:
            TypeError, ValueError: The arguments cannot form a valid payload.
        """
        payload = complete_payload(style_id, model_url, metadata)
        return self.send("POST", COMPLETE_PATH, payload, retry=True, event_id=event_id)

    def send_failed(
        self, style_id: int, error_message: str, error_code: str, event_id: str | None = None
    ) -> bool:
        """Report a failed training, retrying transient failures.

        Args:
            style_id: The style whose training failed.
            error_message: Reason; redacted and truncated before sending.
            error_code: Machine-readable failure code.
            event_id: The event's id, fixed across retries and redeliveries (new if ``None``).

        Returns:
            Whether the backend acknowledged it (2xx).

        Raises:
            TypeError: ``style_id`` is not an int.
        """
        payload = failed_payload(style_id, error_message, error_code, self.secrets())
        return self.send("POST", FAILED_PATH, payload, retry=True, event_id=event_id)

    def send(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any],
        *,
        retry: bool,
        event_id: str | None = None,
        timestamp: int | None = None,
        max_total_s: float | None = None,
    ) -> bool:
        """Send one JSON webhook; never raises on network or HTTP errors.

        Args:
            method: HTTP method.
            path: Path under ``base_url`` (one of the ``*_PATH`` constants).
            payload: JSON body.
            retry: Whether to retry transient failures (connection errors, timeouts, 5xx, 408,
                429) with exponential backoff and full jitter, within ``max_attempts`` and
                ``max_total_s``.
            event_id: The event's id (``Idempotency-Key``/``webhook-id``); a new one if ``None``.
            timestamp: The event's creation time (``webhook-timestamp``); now if ``None``.
            max_total_s: This call's time budget instead of the client's.

        Returns:
            Whether the backend answered 2xx.
        """
        # The retry loop is hand-written rather than tenacity: each attempt's timeout is cut to
        # the time left in the budget, and a small Retry-After replaces the backoff.
        # canonical (sorted keys): every re-send of one event has the very same bytes
        body = json.dumps(payload, allow_nan=False, sort_keys=True).encode("utf-8")
        event_id = event_id or new_event_id()
        timestamp = int(time.time()) if timestamp is None else int(timestamp)
        headers = self._headers(event_id, timestamp, body)
        label = f"{method} {path} (style {payload.get('style_id')}, event {event_id})"
        max_attempts = self.max_attempts if retry else 1
        budget = self.max_total_s if max_total_s is None else max_total_s
        deadline = time.monotonic() + budget
        outcome = "no time left to attempt"
        attempts = 0
        for attempt in range(1, max_attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining < _MIN_ATTEMPT_TIMEOUT_S:
                break
            attempts = attempt
            ok, retryable, outcome, response = self._attempt(
                method, path, body, headers, min(self.timeout_s, remaining)
            )
            if ok:
                self._log_success(label, attempt, retry)
                return True
            if not retryable or attempt == max_attempts:
                break
            delay = self._backoff_s(attempt, response)
            if time.monotonic() + delay + _MIN_ATTEMPT_TIMEOUT_S > deadline:
                break
            logger.debug(
                "webhook %s attempt %d failed (%s); retry in %.2fs", label, attempt, outcome, delay
            )
            self._sleep(delay)
        log = logger.error if retry else logger.warning
        log("webhook %s given up after %d attempt(s): %s", label, attempts, outcome)
        return False

    # ----------------------------------------------------------------- internals

    def secrets(self) -> tuple[str, ...]:
        """Secrets held by this client that :func:`redact` may not know of."""
        return tuple(s for s in (self._token, self._signing_secret) if s)

    def _headers(self, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        token = self._token
        if token is None:
            token = os.environ.get(TOKEN_ENV_VAR, "").strip()
        headers = {
            "Content-Type": "application/json",
            "X-Request-Source": REQUEST_SOURCE,
            "Idempotency-Key": event_id,
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
        }
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif not self._warned_no_token:
            self._warned_no_token = True
            logger.warning("%s is not set: webhooks are sent without Authorization", TOKEN_ENV_VAR)
        secret = self._signing_secret
        if secret is None:
            secret = os.environ.get(SIGNING_SECRET_ENV_VAR, "").strip()
        if secret:
            headers["webhook-signature"] = sign_webhook(secret, event_id, timestamp, body)
        return headers

    def _attempt(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str], deadline_s: float
    ) -> tuple[bool, bool, str, HttpReply | None]:
        """Make one request, over within ``deadline_s`` seconds whatever the backend does.

        Returns:
            ``(succeeded, retryable, outcome description, reply or None)``.
        """
        try:
            reply = request_with_deadline(method, self.base_url + path, body, headers, deadline_s)
        except OSError as exc:  # refused, reset, TLS, the deadline (a TimeoutError)
            return False, True, redact(f"{type(exc).__name__}: {exc}"), None
        except http.client.HTTPException as exc:  # a malformed answer
            return False, True, redact(f"{type(exc).__name__}: {exc}"), None
        status = reply.status
        reason = redact(f"HTTP {status} {reply.reason or ''}".strip())
        if 200 <= status < 300:
            return True, False, reason, reply
        return False, _is_retryable_status(status), reason, reply

    def _backoff_s(self, attempt: int, response: HttpReply | None) -> float:
        """Seconds to wait after failed ``attempt``: full jitter, or a small ``Retry-After``."""
        if response is not None:
            retry_after = _retry_after_s(response)
            if retry_after is not None and retry_after <= self.backoff_max_s:
                return retry_after
        return backoff_delay(attempt - 1, self.backoff_base_s, self.backoff_max_s)

    def _log_success(self, label: str, attempt: int, retry: bool) -> None:
        if retry:
            logger.info("webhook %s delivered after %d attempt(s)", label, attempt)
        else:
            logger.debug("webhook %s delivered", label)
