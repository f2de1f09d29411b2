"""The backend's contract as data: style ids and the bodies of the training webhooks.

A ``style_id`` is the backend's database key: an ``int`` (not a ``bool``) in
``1..MAX_STYLE_ID``. The job schema, the webhook payloads and every S3 key use the one rule of
:func:`style_id_problem`.

All three are under ``{webhook_url}/api/webhooks/training/``:

* ``PATCH progress``: ``{"style_id", "progress": {"current_epoch", "total_epochs",
  "progress_percent", "estimated_seconds"}}``;
* ``POST complete``: ``{"style_id", "model_url", "metadata"}``;
* ``POST failed``: ``{"style_id", "error_message", "error_code"}`` (redacted, truncated).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_lora.clients.redaction import MASK, redact

__all__ = [
    "COMPLETE_PATH",
    "FAILED_PATH",
    "MAX_ERROR_MESSAGE_CHARS",
    "MAX_STYLE_ID",
    "PROGRESS_PATH",
    "check_style_id",
    "complete_payload",
    "failed_payload",
    "progress_payload",
    "style_id_problem",
    "truncate",
]

MAX_STYLE_ID = 2**63 - 1
"""Largest ``style_id``: the backend's key is a signed 64-bit integer."""


def style_id_problem(style_id: object) -> str | None:
    """Why ``style_id`` is not a style id, or ``None`` when it is one.

    A style id is the backend's database key: an ``int`` (not a ``bool``) in
    ``1..MAX_STYLE_ID``. The job schema, the webhook payloads and every S3 key use this one rule.
    """
    if isinstance(style_id, bool) or not isinstance(style_id, int):
        return f"must be an int, got {type(style_id).__name__}"
    if not 0 < style_id <= MAX_STYLE_ID:
        return f"must be in 1..{MAX_STYLE_ID}"
    return None


def check_style_id(style_id: object) -> int:
    """Return ``style_id`` if it is a style id (see :func:`style_id_problem`).

    Raises:
        TypeError: It is not an int.
        ValueError: It is out of range.
    """
    problem = style_id_problem(style_id)
    if problem is not None:
        error = (
            ValueError
            if isinstance(style_id, int) and not isinstance(style_id, bool)
            else TypeError
        )
        raise error(f"style_id {problem}")
    assert isinstance(style_id, int)  # style_id_problem accepted it
    return style_id


logger = logging.getLogger(__name__)

PROGRESS_PATH = "/api/webhooks/training/progress"
COMPLETE_PATH = "/api/webhooks/training/complete"
FAILED_PATH = "/api/webhooks/training/failed"
MAX_ERROR_MESSAGE_CHARS = 2000
REQUIRED_METADATA_KEYS = ("training_epochs", "lora_rank", "lora_alpha")
_TRUNCATION_MARK = "... [truncated]"


def _jsonable(value: Any) -> Any:
    """Return ``value`` with non-finite floats as ``None`` and unknown objects as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    item = getattr(value, "item", None)  # numpy / torch scalars, without importing them
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def progress_payload(
    style_id: int,
    current_epoch: int,
    total_epochs: int,
    progress_percent: int,
    estimated_seconds: int,
) -> dict[str, Any]:
    """Build the progress webhook body.

    Args:
        style_id: The style being trained.
        current_epoch: Epochs done so far.
        total_epochs: Epochs planned.
        progress_percent: Overall progress, clamped to 0..100.
        estimated_seconds: Estimated seconds left, at least 0.

    Returns:
        ``{"style_id": ..., "progress": {...}}`` with integer fields.
    """
    return {
        "style_id": check_style_id(style_id),
        "progress": {
            "current_epoch": max(0, int(current_epoch)),
            "total_epochs": max(0, int(total_epochs)),
            "progress_percent": min(100, max(0, int(progress_percent))),
            "estimated_seconds": max(0, int(estimated_seconds)),
        },
    }


def complete_payload(style_id: int, model_url: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Build the completion webhook body.

    Args:
        style_id: The style trained.
        model_url: ``s3://bucket/key`` of the final LoRA.
        metadata: Training facts; should hold ``training_epochs``, ``lora_rank`` and
            ``lora_alpha``. Non-finite floats become ``null``.

    Returns:
        ``{"style_id": ..., "model_url": ..., "metadata": {...}}``.
    """
    if not isinstance(model_url, str) or not model_url.startswith("s3://"):
        raise ValueError("model_url must be an s3:// URL")
    if not isinstance(metadata, Mapping):
        raise TypeError("metadata must be a mapping")
    missing = [key for key in REQUIRED_METADATA_KEYS if key not in metadata]
    if missing:
        logger.warning("completion metadata for style %s lacks %s", style_id, ", ".join(missing))
    return {
        "style_id": check_style_id(style_id),
        "model_url": model_url,
        "metadata": _jsonable(dict(metadata)),
    }


def truncate(text: str, limit: int = MAX_ERROR_MESSAGE_CHARS) -> str:
    """Cut ``text`` to at most ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(_TRUNCATION_MARK))] + _TRUNCATION_MARK


def failed_payload(
    style_id: int, error_message: str, error_code: str, extra_secrets: Iterable[str] = ()
) -> dict[str, Any]:
    """Build the failure webhook body; the message is redacted and truncated.

    Args:
        style_id: The style whose training failed.
        error_message: Human-readable reason; secrets are masked (see
            :func:`~lightning_lora.clients.redaction.redact`) and it is cut to
            :data:`MAX_ERROR_MESSAGE_CHARS` characters.
        error_code: Machine-readable code (see ``lightning_lora.errors``).
        extra_secrets: More values to mask (e.g. a token not taken from the environment).

    Returns:
        ``{"style_id": ..., "error_message": ..., "error_code": ...}``.
    """
    message = str(error_message)
    for secret in extra_secrets:
        if secret:
            message = message.replace(secret, MASK)
    return {
        "style_id": check_style_id(style_id),
        "error_message": truncate(redact(message)),
        "error_code": str(error_code) or "TRAINING_FAILED",
    }
