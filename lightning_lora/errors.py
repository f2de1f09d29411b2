"""Errors that carry the failure code reported to the platform backend, and the one rule.

Every error raised on purpose by lightning_lora derives from :class:`LightningLoraError` and has
an ``error_code`` that the failure webhook sends as ``error_code`` (see README, "Failure codes").
Anything else that escapes a training is reported as ``TRAINING_FAILED``.

Whether an exception fails a job or sends it back to the queue is decided in one place,
:func:`disposition_of`: every caller (the job's report, the runner, the worker) asks it.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "DatasetError",
    "Disposition",
    "DownloadError",
    "InvalidImageError",
    "InvalidMessageError",
    "JobCancelledError",
    "JobCrashedError",
    "JobInterrupted",
    "LightningLoraError",
    "NonFiniteLossError",
    "PreconditionFailedError",
    "StorageUnavailableError",
    "UploadError",
    "disposition_of",
    "project_error",
]


class LightningLoraError(Exception):
    """Base class: an error with a machine-readable failure code for the backend."""

    error_code: str = "TRAINING_FAILED"


class InvalidImageError(LightningLoraError, ValueError):
    """A training image is unreadable, corrupt, too large or of an unsupported type."""

    error_code = "INVALID_IMAGE"


class DatasetError(LightningLoraError, ValueError):
    """The training set as a whole is unusable (no images, bad caption file, bad options)."""

    error_code = "INVALID_DATASET"


class DownloadError(LightningLoraError):
    """Training images could not be fetched from object storage."""

    error_code = "DOWNLOAD_FAILED"


class UploadError(LightningLoraError):
    """A checkpoint or the final LoRA could not be stored in object storage."""

    error_code = "UPLOAD_FAILED"


class InvalidMessageError(LightningLoraError, ValueError):
    """A queue message is not a valid training job."""

    error_code = "INVALID_MESSAGE"


class NonFiniteLossError(LightningLoraError, FloatingPointError):
    """The training loss became NaN or infinite; training stops before writing a broken LoRA."""

    error_code = "NON_FINITE_LOSS"


class JobInterrupted(LightningLoraError):
    """The worker is shutting down: the job checkpointed and goes back to the queue.

    Not a failure: no failure webhook is sent for it.
    """

    error_code = "INTERRUPTED"


class JobCancelledError(LightningLoraError):
    """The backend cancelled the job's style: the job stops, reports once and is acknowledged.

    A failure the backend asked for: one ``failed`` webhook with ``error_code: "CANCELLED"``,
    and the message is acknowledged (not dead-lettered: there is nothing to retry).
    """

    error_code = "CANCELLED"


class JobCrashedError(LightningLoraError):
    """A job reached the redelivery limit (it crashed or stalled workers repeatedly)."""

    error_code = "REDELIVERY_LIMIT"


class StorageUnavailableError(LightningLoraError):
    """S3 stayed unreachable (or kept answering 5xx) for the whole retry budget.

    Not the job's fault: the worker requeues the job instead of failing it.
    """

    error_code = "STORAGE_UNAVAILABLE"


class PreconditionFailedError(LightningLoraError):
    """A conditional S3 write lost its race (``If-None-Match``/``If-Match`` answered 412)."""

    error_code = "TRAINING_FAILED"


_REQUEUED = (JobInterrupted, StorageUnavailableError)
"""Not the job's fault: a shutdown, or S3 down for the whole retry budget."""


def project_error(exc: BaseException) -> LightningLoraError | None:
    """The first :class:`LightningLoraError` of ``exc``'s chain, or ``None``.

    The chain is ``exc``, then each ``__cause__`` (``raise ... from``) or, without one,
    ``__context__`` (an error raised while handling another), as Python prints it.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, LightningLoraError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@dataclasses.dataclass(frozen=True)
class Disposition:
    """What a job's exception means for the job.

    Attributes:
        requeue: Put the job back on the queue and report nothing (a shutdown, S3 down);
            otherwise the job failed and gets one failure report.
        error_code: The failure code to report (``None`` when requeued).
        error: The project error that decided, if the chain has one.
        dead_letter: A failed job's message goes to the dead-letter queue (for an operator to
            look at); ``False`` for a cancelled job, whose message is simply acknowledged.
    """

    requeue: bool
    error_code: str | None
    error: LightningLoraError | None
    dead_letter: bool = True


def disposition_of(exc: BaseException) -> Disposition:
    """Fail with a code, or requeue: the one rule for every exception of a job.

    The first :class:`LightningLoraError` of the chain (:func:`project_error`) decides: a
    :class:`JobInterrupted` or :class:`StorageUnavailableError` requeues the job (also when
    another error was raised while handling it: S3 being down caused it), any other fails it with
    its ``error_code``; a :class:`JobCancelledError` fails it without dead-lettering. An
    exception with no project error in its chain fails the job as ``TRAINING_FAILED``.

    Args:
        exc: What ended the job.

    Returns:
        The disposition.
    """
    error = project_error(exc)
    if isinstance(error, _REQUEUED):
        return Disposition(requeue=True, error_code=None, error=error)
    code = error.error_code if error is not None else LightningLoraError.error_code
    cancelled = isinstance(error, JobCancelledError)
    return Disposition(requeue=False, error_code=code, error=error, dead_letter=not cancelled)
