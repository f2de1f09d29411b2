"""S3 failures: which ones may pass by themselves, and retrying those within a time budget.

Every S3 call of :class:`~lightning_lora.clients.storage.S3Storage` goes through :func:`retrying`:
connection errors, timeouts, 5xx and throttling are retried with exponential backoff and full jitter
(tenacity, with :mod:`lightning_lora.clients.backoff`'s RNG) until the budget is spent, then raised
as :class:`~lightning_lora.errors.StorageUnavailableError`, which the worker answers by requeueing
the job rather than failing it. Anything else (404, 403, 412) is raised at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import boto3.exceptions
import botocore.exceptions
import tenacity

from lightning_lora.clients.backoff import tenacity_wait
from lightning_lora.errors import StorageUnavailableError

__all__ = [
    "BOTO_ERRORS",
    "DEFAULT_RETRY_BUDGET_S",
    "describe",
    "error_code",
    "is_not_found",
    "is_precondition_failed",
    "is_transient",
    "retrying",
]

logger = logging.getLogger(__name__)

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_PRECONDITION_CODES = frozenset({"412", "PreconditionFailed", "ConditionalRequestConflict", "409"})
_TRANSIENT_CODES = frozenset(
    {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "Throttling"}
)
DEFAULT_RETRY_BUDGET_S = 300.0
"""Default seconds an S3 operation keeps retrying transient failures (``S3_RETRY_BUDGET_S``)."""
BOTO_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
)


def error_code(exc: BaseException) -> str:
    """The S3 error code (or HTTP status) of a boto error, ``""`` for other errors."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(error.get("Code") or status or "")
    return ""


def is_not_found(exc: BaseException) -> bool:
    """Whether the error says the object or bucket does not exist."""
    return error_code(exc) in _NOT_FOUND_CODES


def is_transient(exc: BaseException) -> bool:
    """Whether an S3 failure may go away by itself (connection trouble, timeouts, 5xx, 429)."""
    if isinstance(
        exc,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.ReadTimeoutError,
    ):
        return True
    if isinstance(exc, boto3.exceptions.S3UploadFailedError):
        cause = exc.__cause__ or exc.__context__
        return cause is not None and is_transient(cause)
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or error_code(exc) in _TRANSIENT_CODES
    return False


def is_precondition_failed(exc: BaseException) -> bool:
    """Whether a conditional request's condition did not hold (412, or a 409 conflict)."""
    return isinstance(exc, botocore.exceptions.ClientError) and (
        error_code(exc) in _PRECONDITION_CODES
        or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)
    )


def describe(exc: BaseException) -> str:
    """Return a short description of a boto error (no credentials ever appear in these)."""
    return f"{type(exc).__name__}: {exc}"


def retrying(budget_s: float, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``call`` until it succeeds, fails for good, or the retry budget is spent.

    Raises:
        StorageUnavailableError: Transient failures lasted the whole budget (names ``what``).
        Exception: A non-transient failure, at once (e.g. 404, 403, 412).
    """
    started = time.monotonic()

    def log_retry(state: tenacity.RetryCallState) -> None:
        assert state.outcome is not None  # tenacity calls before_sleep after a failed attempt
        logger.warning(
            "S3 %s failed (%s); retrying (attempt %d, %.0fs of the %.0fs budget used)",
            what,
            type(state.outcome.exception()).__name__,
            state.attempt_number,
            time.monotonic() - started,
            budget_s,
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(budget_s),
        wait=tenacity_wait(0.25, 15.0),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        return retrying(call, *args, **kwargs)
    except Exception as exc:
        if is_transient(exc):
            raise StorageUnavailableError(
                f"S3 unreachable for {time.monotonic() - started:.0f}s while trying to {what}"
                f" ({describe(exc)}); the job will be retried"
            ) from exc
        raise
