"""Identifiers and the bucket layout: one place for style ids, run ids and every S3 key.

The final LoRA keys are the backend contract; everything else is the worker's own state:

* ``models/style_{id}/lora_weights.safetensors``: the final LoRA, diffusers format (contract);
* ``models/style_{id}/lora_kohya.safetensors``: the same LoRA in kohya format;
* ``checkpoints/style_{id}/{run_id}/epochEEEE-stepSSSSSS.ckpt``: a run's training checkpoints;
* ``checkpoints/style_{id}/{run_id}/lease.json``: which worker runs the run now (conditional
  writes, renewed while training);
* ``checkpoints/style_{id}/{run_id}/outcome.json``: the run's terminal webhook, created once
  (``If-None-Match: *``); whoever creates it is the one worker that reports the run;
* ``checkpoints/style_{id}/_jobs/{job_key}.json``: the newest run (generation) of a job key, so
  a redelivery finds its run and a new publication of the same body starts a new one;
* ``outbox/style_{id}/{run_id}.json``: a terminal webhook not yet acknowledged by the backend.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Collection

from lightning_lora.errors import InvalidMessageError

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_S3_URL_LENGTH",
    "MAX_STYLE_ID",
    "OUTBOX_PREFIX",
    "bucket_problem",
    "check_run_id",
    "check_style_id",
    "checkpoint_prefix",
    "job_key_for",
    "job_pointer_key",
    "kohya_key",
    "lease_key",
    "model_key",
    "outbox_key",
    "outcome_key",
    "parse_s3_url",
    "run_id_for",
    "s3_url_problem",
    "shown",
    "style_id_problem",
    "validate_key",
]

RUN_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,80}")
MAX_STYLE_ID = 2**63 - 1
"""Largest ``style_id``: the backend's key is a signed 64-bit integer."""
MAX_KEY_BYTES = 1024
MAX_S3_URL_LENGTH = 1100
"""``s3://`` + a bucket (at most 63 chars) + ``/`` + a key (at most 1024 bytes in S3)."""
_MAX_SHOWN = 200
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
OUTBOX_PREFIX = "outbox/"
_JOBS_FOLDER = "_jobs"


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
    return style_id  # type: ignore[return-value]


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it can be a key segment: ``[A-Za-z0-9._-]{1,80}``, not ``.``/``..``.

    Raises:
        ValueError: Otherwise.
    """
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or run_id in {".", ".."}:
        raise ValueError(f"run id {run_id!r} must match [A-Za-z0-9._-]{{1,80}}")
    return run_id


def model_key(style_id: int) -> str:
    """The final LoRA (contract): ``models/style_{id}/lora_weights.safetensors``."""
    return f"models/style_{check_style_id(style_id)}/lora_weights.safetensors"


def kohya_key(style_id: int) -> str:
    """The kohya-format LoRA: ``models/style_{id}/lora_kohya.safetensors``."""
    return f"models/style_{check_style_id(style_id)}/lora_kohya.safetensors"


def checkpoint_prefix(style_id: int, run_id: str | None = None) -> str:
    """A style's checkpoint folder, or one run's: ``checkpoints/style_{id}/[{run_id}/]``.

    Checkpoints are kept per run, so a new job for the same style never resumes an older job.
    """
    base = f"checkpoints/style_{check_style_id(style_id)}/"
    return base if run_id is None else f"{base}{check_run_id(run_id)}/"


def lease_key(style_id: int, run_id: str) -> str:
    """The run's lease object."""
    return checkpoint_prefix(style_id, run_id) + "lease.json"


def outcome_key(style_id: int, run_id: str) -> str:
    """The run's terminal outcome, created once."""
    return checkpoint_prefix(style_id, run_id) + "outcome.json"


def job_pointer_key(style_id: int, job_key: str) -> str:
    """The record of a job key's newest generation."""
    return f"{checkpoint_prefix(style_id)}{_JOBS_FOLDER}/{check_run_id(job_key)}.json"


def outbox_key(style_id: int, run_id: str) -> str:
    """A pending terminal webhook of a run."""
    return f"{OUTBOX_PREFIX}style_{check_style_id(style_id)}/{check_run_id(run_id)}.json"


def job_key_for(message_id: str | None, body: bytes) -> str:
    """A job's key: its AMQP ``message_id`` when usable as a key segment, else a body hash.

    Args:
        message_id: The message's ``message_id`` property (often absent).
        body: The raw message body.

    Returns:
        ``message_id``, or ``mid-<32 hex>`` of it when it is too long or has other characters,
        or ``sha-<32 hex>`` of the body when there is no message id.
    """
    if message_id:
        if RUN_ID_RE.fullmatch(message_id) and message_id not in {".", ".."}:
            return message_id
        return "mid-" + hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()[:32]
    return "sha-" + hashlib.sha256(body).hexdigest()[:32]


def run_id_for(job_key: str, generation: int) -> str:
    """The run id of a job key's ``generation`` (1 for the first publication).

    Generation 1 keeps the bare job key (so a message id is its run id); later generations
    append ``.g{n}``.
    """
    if generation < 1:
        raise ValueError("generation must be >= 1")
    run_id = job_key if generation == 1 else f"{job_key}.g{generation}"
    if len(run_id) > 80:
        run_id = "run-" + hashlib.sha256(run_id.encode()).hexdigest()[:32]
    return check_run_id(run_id)


# --------------------------------------------------------------------------- S3 URLs and keys
# One set of rules for every S3 URL and key: the message schema, the downloads and our own keys.


def shown(value: object) -> str:
    """A short, printable rendering of a (possibly hostile) value for messages."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid S3 bucket name, or ``None`` if it is."""
    if not _BUCKET_RE.match(bucket):
        return "bucket name must be 3-63 lowercase letters, digits, dots or hyphens"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "bucket name has an empty or malformed label"
    try:
        ipaddress.ip_address(bucket)
    except ValueError:
        return None
    return "bucket name must not be an IP address"


def _key_problem(key: str) -> str | None:
    if not key:
        return "is empty"
    if _CONTROL_RE.search(key):
        return "contains control characters"
    if key.startswith(("/", "\\")):
        return "must not be absolute (leading '/')"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"is longer than {MAX_KEY_BYTES} bytes"
    if any(part in (".", "..") for part in re.split(r"[/\\]", key)):
        return "must not contain '.' or '..' segments"
    return None


def s3_url_problem(url: object) -> str | None:
    """Why ``url`` is not a plain ``s3://bucket/key`` object URL, or ``None`` if it is."""
    if not isinstance(url, str):
        return "URL is not a string"
    if len(url) > MAX_S3_URL_LENGTH:
        return f"URL is longer than {MAX_S3_URL_LENGTH} characters"
    if _CONTROL_RE.search(url):
        return "URL contains control characters"
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "s3":
        return "URL must be of the form s3://bucket/key (only the s3 scheme is allowed)"
    bucket, slash, key = rest.partition("/")
    if not bucket:
        return "URL has an empty bucket"
    problem = bucket_problem(bucket)
    if problem:
        return f"URL has an invalid bucket: {problem}"
    if not slash or not key:
        return "URL has an empty key"
    if key.endswith("/"):
        return "URL key names a folder, not an object"
    problem = _key_problem(key)
    return f"URL key {problem}" if problem else None


def parse_s3_url(url: str, allowed_buckets: Collection[str] | None = None) -> tuple[str, str]:
    """Split an ``s3://bucket/key`` URL, rejecting anything else.

    Args:
        url: The URL, e.g. from a job message.
        allowed_buckets: If given, the only buckets accepted.

    Returns:
        ``(bucket, key)``.

    Raises:
        InvalidMessageError: Naming the URL: another scheme (``file://``, ``http://``...), an
            invalid or disallowed bucket, an empty, absolute or ``..`` key, a key ending in
            ``/``, control characters, or too long (see :func:`s3_url_problem`).
    """
    problem = s3_url_problem(url)
    if problem:
        raise InvalidMessageError(f"invalid S3 URL {shown(url)}: {problem}")
    bucket, _, key = url.partition("://")[2].partition("/")
    if allowed_buckets is not None and bucket not in allowed_buckets:
        raise InvalidMessageError(f"invalid S3 URL {shown(url)}: bucket {bucket!r} is not allowed")
    return bucket, key


def validate_key(key: str) -> str:
    """Check an object key built by this package or given by a caller.

    Returns:
        ``key`` unchanged.

    Raises:
        InvalidMessageError: The key is empty, absolute, has ``..`` segments or control
            characters, or is too long.
    """
    if not isinstance(key, str):
        raise InvalidMessageError(f"invalid object key {shown(key)}: not a string")
    problem = _key_problem(key)
    if problem:
        raise InvalidMessageError(f"invalid object key {shown(key)}: object key {problem}")
    return key
