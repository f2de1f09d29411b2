"""S3 object storage: training images in, checkpoints and LoRA weights out.

Configuration comes from the environment: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
(through boto3's default credential chain), ``S3_BUCKET`` (default ``stylelicense-models``) and
optionally ``S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``) for S3-compatible stores.

Layout in the bucket:

* ``models/style_{style_id}/lora_weights.safetensors``: the final LoRA (:func:`model_key`);
* ``models/style_{style_id}/lora_kohya.safetensors``: the same in kohya format
  (:func:`kohya_key`);
* ``checkpoints/style_{style_id}/...``: training checkpoints (:func:`checkpoint_prefix`).

Failures are raised as :class:`~lightning_lora.errors.DownloadError`,
:class:`~lightning_lora.errors.UploadError`, :class:`~lightning_lora.errors.InvalidImageError`,
:class:`~lightning_lora.errors.DatasetError` or
:class:`~lightning_lora.errors.InvalidMessageError`, each naming the object concerned.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import boto3.exceptions
import boto3.s3.transfer
import botocore.config
import botocore.exceptions

from lightning_lora.errors import (
    DatasetError,
    DownloadError,
    InvalidImageError,
    InvalidMessageError,
    UploadError,
)

__all__ = [
    "DEFAULT_BUCKET",
    "S3Storage",
    "checkpoint_prefix",
    "kohya_key",
    "model_key",
    "parse_s3_url",
    "validate_key",
]

logger = logging.getLogger(__name__)

DEFAULT_BUCKET = "stylelicense-models"
MIB = 1024 * 1024
MAX_KEY_BYTES = 1024
_CHUNK_BYTES = MIB
_MAX_URL_IN_MESSAGE = 200
_MAX_BASENAME_CHARS = 100
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]+")
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_BOTO_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
)


# --------------------------------------------------------------------------- keys and URLs


def _shown(url: object) -> str:
    """Return a short, printable rendering of a (possibly hostile) URL for messages."""
    text = repr(url)
    if len(text) > _MAX_URL_IN_MESSAGE:
        text = text[: _MAX_URL_IN_MESSAGE - 3] + "..."
    return text


def _bucket_problem(bucket: str) -> str | None:
    """Return why ``bucket`` is not a valid S3 bucket name, or ``None`` if it is."""
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
    """Return why ``key`` is not an acceptable object key, or ``None`` if it is."""
    if not key:
        return "object key is empty"
    if _CONTROL_RE.search(key):
        return "object key contains control characters"
    if key.startswith(("/", "\\")):
        return "object key must not be absolute (leading '/')"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"object key is longer than {MAX_KEY_BYTES} bytes"
    if any(part in (".", "..") for part in re.split(r"[/\\]", key)):
        return "object key must not contain '.' or '..' segments"
    return None


def validate_key(key: str) -> str:
    """Check an object key built by this package or given by a caller.

    Args:
        key: The object key.

    Returns:
        ``key`` unchanged.

    Raises:
        InvalidMessageError: The key is empty, absolute, has ``..`` segments or control
            characters, or is too long.
    """
    if not isinstance(key, str):
        raise InvalidMessageError(f"invalid object key {_shown(key)}: not a string")
    problem = _key_problem(key)
    if problem:
        raise InvalidMessageError(f"invalid object key {_shown(key)}: {problem}")
    return key


def parse_s3_url(url: str, allowed_buckets: Collection[str] | None = None) -> tuple[str, str]:
    """Split an ``s3://bucket/key`` URL, rejecting anything else.

    Args:
        url: The URL, e.g. from a job message.
        allowed_buckets: If given, the only buckets accepted.

    Returns:
        ``(bucket, key)``.

    Raises:
        InvalidMessageError: The URL is not a string, has another scheme (``file://``,
            ``http://``...), an invalid or disallowed bucket, an empty, absolute or ``..`` key,
            a key ending in ``/``, or control characters. The message names the URL.
    """

    def reject(problem: str) -> InvalidMessageError:
        return InvalidMessageError(f"invalid S3 URL {_shown(url)}: {problem}")

    if not isinstance(url, str):
        raise reject("not a string")
    if _CONTROL_RE.search(url):
        raise reject("contains control characters")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "s3":
        raise reject("only s3://bucket/key URLs are accepted")
    bucket, slash, key = rest.partition("/")
    if not bucket:
        raise reject("bucket is empty")
    problem = _bucket_problem(bucket)
    if problem:
        raise reject(problem)
    if allowed_buckets is not None and bucket not in allowed_buckets:
        raise reject(f"bucket {bucket!r} is not allowed")
    if not slash or not key:
        raise reject("object key is empty")
    if key.endswith("/"):
        raise reject("object key names a folder, not an object")
    problem = _key_problem(key)
    if problem:
        raise reject(problem)
    return bucket, key


def _check_style_id(style_id: int) -> int:
    if isinstance(style_id, bool) or not isinstance(style_id, int) or style_id < 0:
        raise InvalidMessageError(f"style_id must be a non-negative int, got {style_id!r}")
    return style_id


def model_key(style_id: int) -> str:
    """Return the key of a style's final LoRA: ``models/style_{id}/lora_weights.safetensors``."""
    return f"models/style_{_check_style_id(style_id)}/lora_weights.safetensors"


def kohya_key(style_id: int) -> str:
    """Return the key of a style's kohya LoRA: ``models/style_{id}/lora_kohya.safetensors``."""
    return f"models/style_{_check_style_id(style_id)}/lora_kohya.safetensors"


_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,80}")


def checkpoint_prefix(style_id: int, run_id: str | None = None) -> str:
    """Return the prefix of a style's checkpoints.

    Args:
        style_id: The style.
        run_id: A job's identity: its checkpoints live under ``checkpoints/style_{id}/{run_id}/``,
            so a new job for the same style never resumes an older job's training.

    Returns:
        ``checkpoints/style_{id}/`` or ``checkpoints/style_{id}/{run_id}/``.
    """
    base = f"checkpoints/style_{_check_style_id(style_id)}/"
    if run_id is None:
        return base
    if not _RUN_ID.fullmatch(run_id) or run_id in {".", ".."}:
        raise ValueError(f"run id {run_id!r} must match [A-Za-z0-9._-]{{1,80}}")
    return f"{base}{run_id}/"


def local_image_name(index: int, key: str, width: int = 4) -> str:
    """Return a safe, collision-free local file name for the ``index``-th image.

    Only the key's basename is kept, restricted to ``[A-Za-z0-9._-]``, without leading dots
    and capped in length (keeping the extension); the index prefix makes names unique.

    Args:
        index: Position of the image in the job's list.
        key: The image's object key.
        width: Zero-padding of the index.

    Returns:
        E.g. ``0003_1.jpg``.
    """
    base = re.split(r"[/\\]", key)[-1]
    base = _UNSAFE_NAME_CHARS_RE.sub("_", base).lstrip(".")
    if len(base) > _MAX_BASENAME_CHARS:
        stem, dot, ext = base.rpartition(".")
        if dot and stem and len(ext) <= 10:
            base = f"{stem[: _MAX_BASENAME_CHARS - len(ext) - 1]}.{ext}"
        else:
            base = base[:_MAX_BASENAME_CHARS]
    return f"{index:0{width}d}_{base or 'image'}"


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(error.get("Code") or status or "")
    return ""


def _is_not_found(exc: BaseException) -> bool:
    return _error_code(exc) in _NOT_FOUND_CODES


def _describe(exc: BaseException) -> str:
    """Return a short description of a boto error (no credentials ever appear in these)."""
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- storage


class S3Storage:
    """An S3 bucket accessed through boto3, with bounded retries and timeouts.

    Args:
        bucket: Bucket name; ``S3_BUCKET`` or ``stylelicense-models`` when ``None``.
        endpoint_url: S3-compatible endpoint; ``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` when
            ``None`` (AWS itself when neither is set).
        region_name: AWS region; boto3's default resolution when ``None``.
        max_attempts: Total attempts per request (botocore "standard" retry mode).
        connect_timeout_s: Connect timeout per request.
        read_timeout_s: Read timeout per request.
        multipart_threshold_mb: Size from which transfers use multipart.
    """

    def __init__(
        self,
        bucket: str | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        max_attempts: int = 5,
        connect_timeout_s: float = 5,
        read_timeout_s: float = 60,
        multipart_threshold_mb: int = 8,
    ) -> None:
        self.bucket = bucket or os.environ.get("S3_BUCKET") or DEFAULT_BUCKET
        problem = _bucket_problem(self.bucket)
        if problem:
            raise ValueError(f"invalid bucket {self.bucket!r}: {problem}")
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("S3_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        options: dict[str, Any] = {
            "retries": {"max_attempts": max_attempts, "mode": "standard"},
            "connect_timeout": connect_timeout_s,
            "read_timeout": read_timeout_s,
        }
        if self.endpoint_url:  # S3-compatible stores (MinIO, moto...) expect path-style URLs
            options["s3"] = {"addressing_style": "path"}
        config = botocore.config.Config(**options)
        session = boto3.session.Session()
        self.client = session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=region_name, config=config
        )
        self.transfer_config = boto3.s3.transfer.TransferConfig(
            multipart_threshold=int(multipart_threshold_mb * MIB), max_concurrency=4
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    # ----------------------------------------------------------------- naming

    model_key = staticmethod(model_key)
    kohya_key = staticmethod(kohya_key)
    checkpoint_prefix = staticmethod(checkpoint_prefix)

    def s3_url(self, key: str) -> str:
        """Return ``s3://{bucket}/{key}``."""
        return f"s3://{self.bucket}/{key}"

    # ----------------------------------------------------------------- images

    def download_images(
        self,
        urls: Sequence[str],
        dest_dir: str | os.PathLike[str],
        max_count: int,
        max_bytes_per_file: int,
        max_total_bytes: int,
        allowed_buckets: Collection[str] | None = None,
    ) -> list[Path]:
        """Download training images into ``dest_dir``.

        Every URL is validated before anything is fetched. Each object's size is checked with
        a HEAD request before it is downloaded, and the bytes written are counted again.
        Files are named by :func:`local_image_name`, so keys are never used as paths.

        Args:
            urls: ``s3://bucket/key`` URLs, in the job's order.
            dest_dir: Folder to write into (created if missing).
            max_count: Most URLs accepted.
            max_bytes_per_file: Largest image accepted, in bytes.
            max_total_bytes: Largest total accepted, in bytes.
            allowed_buckets: If given, the only buckets images may come from.

        Returns:
            Local paths, in the order of ``urls``.

        Raises:
            InvalidMessageError: ``urls`` is not a list of valid S3 URLs, or has more than
                ``max_count`` of them.
            InvalidImageError: An image is larger than ``max_bytes_per_file`` (names the URL).
            DatasetError: The images together exceed ``max_total_bytes``.
            DownloadError: An object is missing or the store is unreachable after botocore's
                bounded retries (names the URL).
        """
        if isinstance(urls, str | bytes) or not isinstance(urls, Sequence):
            raise InvalidMessageError("image URLs must be a list of s3:// URLs")
        if len(urls) > max_count:
            raise InvalidMessageError(f"too many images: {len(urls)} given, at most {max_count}")
        targets = [parse_s3_url(url, allowed_buckets) for url in urls]
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        width = max(4, len(str(len(urls))))
        paths: list[Path] = []
        total = 0
        for index, (url, (bucket, key)) in enumerate(zip(urls, targets, strict=True)):
            size = self._head_size(bucket, key, url)
            if size > max_bytes_per_file:
                raise InvalidImageError(
                    f"image {url} is too large: {size} bytes, at most {max_bytes_per_file}"
                )
            if total + size > max_total_bytes:
                raise DatasetError(
                    f"training images exceed {max_total_bytes} bytes in total at {url}"
                )
            path = dest / local_image_name(index, key, width)
            if path.resolve().parent != dest.resolve():  # cannot happen; defence in depth
                raise InvalidMessageError(f"invalid S3 URL {_shown(url)}: unsafe file name")
            total += self._get_to_file(bucket, key, url, path, max_bytes_per_file)
            paths.append(path)
        logger.info("downloaded %d image(s), %d bytes, into %s", len(paths), total, dest)
        return paths

    def _head_size(self, bucket: str, key: str, url: str) -> int:
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except _BOTO_ERRORS as exc:
            raise self._download_error(url, exc) from exc
        return int(head.get("ContentLength") or 0)

    def _get_to_file(self, bucket: str, key: str, url: str, path: Path, max_bytes: int) -> int:
        """Stream one object into ``path`` (atomically), at most ``max_bytes``; return its size."""
        part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        written = 0
        try:
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            with body, part.open("wb") as out:
                for chunk in body.iter_chunks(_CHUNK_BYTES):
                    written += len(chunk)
                    if written > max_bytes:
                        raise InvalidImageError(
                            f"image {url} is too large: more than {max_bytes} bytes"
                        )
                    out.write(chunk)
            os.replace(part, path)
        except _BOTO_ERRORS as exc:
            raise self._download_error(url, exc) from exc
        except OSError as exc:
            raise DownloadError(f"could not write image {url} to disk: {exc}") from exc
        finally:
            part.unlink(missing_ok=True)
        return written

    @staticmethod
    def _download_error(url: str, exc: BaseException) -> DownloadError:
        if _is_not_found(exc):
            return DownloadError(f"object {url} not found")
        return DownloadError(f"could not download {url}: {_describe(exc)}")

    # ----------------------------------------------------------------- single objects

    def upload_file(
        self,
        path: str | os.PathLike[str],
        key: str,
        extra_metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Upload a local file (multipart above the threshold).

        Args:
            path: Local file.
            key: Destination key in this bucket.
            extra_metadata: S3 user metadata; values are converted to strings.

        Returns:
            ``s3://{bucket}/{key}``.

        Raises:
            UploadError: The file is missing or the upload failed (names the key).
            InvalidMessageError: The key is invalid.
        """
        validate_key(key)
        url = self.s3_url(key)
        source = Path(path)
        if not source.is_file():
            raise UploadError(f"cannot upload {source} to {url}: not a file")
        extra_args: dict[str, Any] = {"ContentType": "application/octet-stream"}
        if extra_metadata:
            extra_args["Metadata"] = {str(k): str(v) for k, v in extra_metadata.items()}
        try:
            self.client.upload_file(
                str(source), self.bucket, key, ExtraArgs=extra_args, Config=self.transfer_config
            )
        except _BOTO_ERRORS as exc:
            raise UploadError(f"could not upload {source.name} to {url}: {_describe(exc)}") from exc
        logger.info("uploaded %s (%d bytes) to %s", source.name, source.stat().st_size, url)
        return url

    def download_file(self, key: str, dest: str | os.PathLike[str]) -> Path:
        """Download an object of this bucket to ``dest`` (written atomically).

        Args:
            key: Object key.
            dest: Local file path; its folder is created if missing.

        Returns:
            ``dest`` as a :class:`~pathlib.Path`.

        Raises:
            DownloadError: The object is missing or the download failed (names the URL).
            InvalidMessageError: The key is invalid.
        """
        validate_key(key)
        url = self.s3_url(key)
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self.client.download_file(self.bucket, key, str(part), Config=self.transfer_config)
            os.replace(part, target)
        except _BOTO_ERRORS as exc:
            raise self._download_error(url, exc) from exc
        finally:
            part.unlink(missing_ok=True)
        return target

    def exists(self, key: str) -> bool:
        """Return whether an object exists.

        Raises:
            DownloadError: The store could not be asked (names the URL).
        """
        validate_key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except _BOTO_ERRORS as exc:
            if _is_not_found(exc):
                return False
            raise self._download_error(self.s3_url(key), exc) from exc
        return True

    # ----------------------------------------------------------------- listings

    def list_keys(self, prefix: str, page_size: int = 1000) -> list[str]:
        """List every key under ``prefix`` (following pagination), sorted.

        Raises:
            DownloadError: The listing failed (names the prefix).
        """
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        )
        try:
            for page in pages:
                keys.extend(item["Key"] for item in page.get("Contents", []))
        except _BOTO_ERRORS as exc:
            url = self.s3_url(prefix)
            raise DownloadError(f"could not list {url}: {_describe(exc)}") from exc
        return sorted(keys)

    def delete_keys(self, keys: Iterable[str]) -> int:
        """Delete objects (missing ones are ignored), 1000 per request.

        Returns:
            The number of keys asked to be deleted.

        Raises:
            UploadError: A deletion failed (names the first key that failed).
        """
        batch = [validate_key(key) for key in keys]
        for start in range(0, len(batch), 1000):
            chunk = batch[start : start + 1000]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
                )
            except _BOTO_ERRORS as exc:
                url = self.s3_url(chunk[0])
                raise UploadError(f"could not delete {url}...: {_describe(exc)}") from exc
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise UploadError(
                    f"could not delete {self.s3_url(first.get('Key', '?'))}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )
        return len(batch)
