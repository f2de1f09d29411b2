"""S3's naming rules, once: bucket names, object keys and ``s3://bucket/key`` URLs.

Every check of a bucket, key or URL uses these functions: the worker's settings (``S3_BUCKET``),
:class:`~lightning_lora.clients.storage.S3Storage`, the job schema's ``image_urls`` and our own
keys (:mod:`lightning_lora.jobs.layout`). Messages name the value with :func:`shown`: short and
printable, whatever a hostile message holds.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection

from lightning_lora.errors import InvalidMessageError

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_S3_URL_LENGTH",
    "bucket_problem",
    "parse_s3_url",
    "s3_url_problem",
    "shown",
    "validate_key",
]

MAX_KEY_BYTES = 1024
MAX_S3_URL_LENGTH = 1100
"""``s3://`` + a bucket (at most 63 chars) + ``/`` + a key (at most 1024 bytes in S3)."""
_MAX_SHOWN = 200
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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
