"""Does the store honour conditional writes? The exactly-once guarantee rests on it.

A run's lease, its outcome and the outbox's claims are compare-and-set writes: ``If-None-Match:
*`` (create only) and ``If-Match: <etag>`` (replace only that version). AWS S3 and current MinIO
honour both; older MinIO, several S3-compatible stores and some proxies drop or ignore them, and
then two workers given one job both train it and both report it. :func:`conditional_write_problems`
tries both on a probe object of the bucket, then deletes it.
"""

from __future__ import annotations

import uuid

from lightning_lora.clients.storage import S3Storage
from lightning_lora.errors import PreconditionFailedError

__all__ = ["PROBE_PREFIX", "conditional_write_problems"]

PROBE_PREFIX = "lightning-lora-probe/"
"""Where the probe object lives for the moment of the check."""

_STALE_ETAG = '"00000000000000000000000000000000"'


def conditional_write_problems(storage: S3Storage) -> list[str]:
    """What the store ignores of the two conditional writes (empty when it honours both).

    1. A create-only write (``If-None-Match: *``) of an object that exists must fail.
    2. A write with a stale ``If-Match`` must fail.

    Args:
        storage: The bucket (its retry budget applies to each call).

    Returns:
        One sentence per condition the store ignored.

    Raises:
        StorageUnavailableError, UploadError, DownloadError: The store could not be asked.
    """
    key = f"{PROBE_PREFIX}conditional-writes-{uuid.uuid4().hex}.json"
    problems = []
    try:
        storage.put_json(key, {"probe": 1}, if_none_match=True)
        try:
            storage.put_json(key, {"probe": 2}, if_none_match=True)
            problems.append(
                "it ignores If-None-Match: * (a create-only write replaced an existing object)"
            )
        except PreconditionFailedError:
            pass
        try:
            storage.put_json(key, {"probe": 3}, if_match=_STALE_ETAG)
            problems.append("it ignores If-Match (a write with a stale ETag replaced the object)")
        except PreconditionFailedError:
            pass
    finally:
        storage.delete_key(key)
    return problems
