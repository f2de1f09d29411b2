"""Errors that carry the failure code reported to the platform backend.

Every error raised on purpose by lightning_lora derives from :class:`LightningLoraError` and has
an ``error_code`` that the failure webhook sends as ``error_code`` (see README, "Failure codes").
Anything else that escapes a training is reported as ``TRAINING_FAILED``.
"""

from __future__ import annotations


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


def error_code_of(exc: BaseException) -> str:
    """Return the backend failure code for an exception.

    Args:
        exc: Any exception raised while running a job.

    Returns:
        The exception's ``error_code`` if it is a :class:`LightningLoraError` (or wraps one as
        its ``__cause__``), else ``"TRAINING_FAILED"``.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, LightningLoraError):
            return current.error_code
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return LightningLoraError.error_code


class JobInterrupted(LightningLoraError):
    """The worker is shutting down: the job checkpointed and goes back to the queue.

    Not a failure: no failure webhook is sent for it.
    """

    error_code = "INTERRUPTED"


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
