"""S3 object storage: training images in, checkpoints and LoRA weights out.

An :class:`S3Storage` is given its bucket, endpoint and retry budget; it reads no environment
itself (the worker passes its checked settings). :meth:`S3Storage.from_env` builds one from the
variables of :data:`S3_ENV` for use outside the worker (notebooks, scripts): ``S3_BUCKET``
(default ``stylelicense-models``), ``S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``) for
S3-compatible stores, and ``S3_RETRY_BUDGET_S``. Credentials come from boto3's default chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``...).

Which keys this package writes is :mod:`lightning_lora.jobs.layout`'s; S3's own naming rules are
:mod:`lightning_lora.clients.s3_names`'.

Failures are raised as :class:`~lightning_lora.errors.DownloadError`,
:class:`~lightning_lora.errors.UploadError`, :class:`~lightning_lora.errors.InvalidImageError`,
:class:`~lightning_lora.errors.DatasetError` or
:class:`~lightning_lora.errors.InvalidMessageError`, each naming the object concerned.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import boto3.exceptions
import boto3.s3.transfer
import botocore.config
import botocore.exceptions

from lightning_lora.clients.image_types import checked_image_format, local_image_name
from lightning_lora.clients.s3_names import bucket_problem, parse_s3_url, shown, validate_key
from lightning_lora.clients.s3_retry import (
    BOTO_ERRORS,
    DEFAULT_RETRY_BUDGET_S,
    describe,
    is_not_found,
    is_precondition_failed,
    retrying,
)
from lightning_lora.clients.store_clock import StoreClock
from lightning_lora.errors import (
    DatasetError,
    DownloadError,
    InvalidImageError,
    InvalidMessageError,
    PreconditionFailedError,
    UploadError,
)

__all__ = ["DEFAULT_BUCKET", "S3_ENV", "S3Storage"]

logger = logging.getLogger(__name__)

DEFAULT_BUCKET = "stylelicense-models"
S3_ENV: dict[str, tuple[str, ...]] = {
    "bucket": ("S3_BUCKET",),
    "endpoint_url": ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
    "retry_budget_s": ("S3_RETRY_BUDGET_S",),
}
"""The variable(s) of each :class:`S3Storage` setting (the first one set wins); the worker's
settings read the same ones (:data:`lightning_lora.worker.settings.WORKER_ENV`)."""
MIB = 1024 * 1024
_CHUNK_BYTES = MIB


# --------------------------------------------------------------------------- storage


class S3Storage:
    """An S3 bucket accessed through boto3, with bounded retries and timeouts.

    Args:
        bucket: Bucket name.
        endpoint_url: S3-compatible endpoint (path-style addressing); AWS itself when ``None``.
        region_name: AWS region; boto3's default resolution when ``None``.
        retry_budget_s: Seconds each operation keeps retrying transient failures (connection
            refused or reset, timeouts, 5xx, throttling), with exponential backoff and full
            jitter. Past it the operation raises
            :class:`~lightning_lora.errors.StorageUnavailableError`.
        connect_timeout_s: Connect timeout per request.
        read_timeout_s: Read timeout per request.
        multipart_threshold_mb: Size from which transfers use multipart.
        wall: This machine's wall clock, from which :attr:`clock` (the store's time) is kept.
    """

    def __init__(
        self,
        bucket: str = DEFAULT_BUCKET,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        connect_timeout_s: float = 5,
        read_timeout_s: float = 60,
        multipart_threshold_mb: int = 8,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.bucket = bucket
        problem = bucket_problem(self.bucket)
        if problem:
            raise ValueError(f"invalid bucket {self.bucket!r}: {problem}")
        self.endpoint_url = endpoint_url or None
        if retry_budget_s < 0:
            raise ValueError("retry_budget_s must be >= 0")
        self.retry_budget_s = float(retry_budget_s)
        options: dict[str, Any] = {
            # one attempt per call: the retries are ours (a time budget, and jitter from an RNG
            # that training seeds don't touch: botocore's draws from the global random)
            "retries": {"total_max_attempts": 1, "mode": "standard"},
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
        #: the store's time, from its answers' Date headers (leases are judged on it)
        self.clock = StoreClock(wall)
        self.clock.attach(self.client)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> S3Storage:
        """A storage configured by :data:`S3_ENV`'s variables (``overrides`` win).

        Args:
            env: The environment (``os.environ`` when ``None``).
            **overrides: Any :class:`S3Storage` argument.

        Raises:
            ValueError: ``S3_RETRY_BUDGET_S`` is not a number, or the bucket name is invalid.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, variables in S3_ENV.items():
            found = next((env[v] for v in variables if env.get(v, "").strip()), None)
            if found is not None:
                values[name] = float(found) if name == "retry_budget_s" else found
        return cls(**{**values, **overrides})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

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
        Files are named by :func:`local_image_name`, so keys are never used as paths. Each
        file's type is told by its first bytes once downloaded (keys often have no extension,
        or the wrong one) and the file gets its content's extension (``.jpg``, ``.png`` or
        ``.webp``), so :func:`lightning_lora.data.datamodule.find_style_images` lists every image.

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
            InvalidImageError: An image is larger than ``max_bytes_per_file``, empty, or not a
                JPEG, PNG or WebP (e.g. a GIF or a text file); names the URL.
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
            fetched = dest / f".{index:0{width}d}.download"  # hidden until its type is known
            total += self._get_to_file(bucket, key, url, fetched, max_bytes_per_file)
            try:
                fmt = checked_image_format(fetched, url)
                path = dest / local_image_name(index, key, width, fmt)
                if path.resolve().parent != dest.resolve():  # cannot happen; defence in depth
                    raise InvalidMessageError(f"invalid S3 URL {shown(url)}: unsafe file name")
                os.replace(fetched, path)
            except OSError as exc:
                raise DownloadError(f"could not write image {url} to disk: {exc}") from exc
            finally:
                fetched.unlink(missing_ok=True)
            paths.append(path)
        logger.info("downloaded %d image(s), %d bytes, into %s", len(paths), total, dest)
        return paths

    def _head_size(self, bucket: str, key: str, url: str) -> int:
        try:
            head = retrying(
                self.retry_budget_s, f"read {url}", self.client.head_object, Bucket=bucket, Key=key
            )
        except BOTO_ERRORS as exc:
            raise self._download_error(url, exc) from exc
        return int(head.get("ContentLength") or 0)

    def _get_to_file(self, bucket: str, key: str, url: str, path: Path, max_bytes: int) -> int:
        """Stream one object into ``path`` (atomically), at most ``max_bytes``; return its size."""
        part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")

        def attempt() -> int:
            written = 0
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            with body, part.open("wb") as out:
                for chunk in body.iter_chunks(_CHUNK_BYTES):
                    written += len(chunk)
                    if written > max_bytes:
                        raise InvalidImageError(
                            f"image {url} is too large: more than {max_bytes} bytes"
                        )
                    out.write(chunk)
            return written

        try:
            written = retrying(self.retry_budget_s, f"download {url}", attempt)
            os.replace(part, path)
        except BOTO_ERRORS as exc:
            raise self._download_error(url, exc) from exc
        except OSError as exc:
            raise DownloadError(f"could not write image {url} to disk: {exc}") from exc
        finally:
            part.unlink(missing_ok=True)
        return written

    @staticmethod
    def _download_error(url: str, exc: BaseException) -> DownloadError:
        if is_not_found(exc):
            return DownloadError(f"object {url} not found")
        return DownloadError(f"could not download {url}: {describe(exc)}")

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
            retrying(
                self.retry_budget_s,
                f"upload {url}",
                self.client.upload_file,
                str(source),
                self.bucket,
                key,
                ExtraArgs=extra_args,
                Config=self.transfer_config,
            )
        except BOTO_ERRORS as exc:
            raise UploadError(f"could not upload {source.name} to {url}: {describe(exc)}") from exc
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
            retrying(
                self.retry_budget_s,
                f"download {url}",
                self.client.download_file,
                self.bucket,
                key,
                str(part),
                Config=self.transfer_config,
            )
            os.replace(part, target)
        except BOTO_ERRORS as exc:
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
            retrying(
                self.retry_budget_s,
                f"read {self.s3_url(key)}",
                self.client.head_object,
                Bucket=self.bucket,
                Key=key,
            )
        except BOTO_ERRORS as exc:
            if is_not_found(exc):
                return False
            raise self._download_error(self.s3_url(key), exc) from exc
        return True

    # ----------------------------------------------------------------- listings

    def list_keys(self, prefix: str, page_size: int = 1000) -> list[str]:
        """List every key under ``prefix`` (following pagination), sorted.

        Raises:
            DownloadError: The listing failed (names the prefix).
        """
        paginator = self.client.get_paginator("list_objects_v2")

        def attempt() -> list[str]:
            keys: list[str] = []
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
            )
            for page in pages:
                keys.extend(item["Key"] for item in page.get("Contents", []))
            return keys

        try:
            keys = retrying(self.retry_budget_s, f"list {self.s3_url(prefix)}", attempt)
        except BOTO_ERRORS as exc:
            url = self.s3_url(prefix)
            raise DownloadError(f"could not list {url}: {describe(exc)}") from exc
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
                response = retrying(
                    self.retry_budget_s,
                    f"delete {self.s3_url(chunk[0])}...",
                    self.client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
                )
            except BOTO_ERRORS as exc:
                url = self.s3_url(chunk[0])
                raise UploadError(f"could not delete {url}...: {describe(exc)}") from exc
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise UploadError(
                    f"could not delete {self.s3_url(first.get('Key', '?'))}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )
        return len(batch)

    # ----------------------------------------------------------------- small JSON records

    def get_json(self, key: str) -> tuple[dict[str, Any], str] | None:
        """Read a JSON object record and its ETag.

        Returns:
            ``(record, etag)``, or ``None`` when the object does not exist.

        Raises:
            DownloadError: The object is not a JSON object, or could not be read.
            StorageUnavailableError: S3 stayed unreachable for the retry budget.
        """
        validate_key(key)
        url = self.s3_url(key)

        def attempt() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            with response["Body"] as body:
                return body.read(), str(response.get("ETag", ""))

        try:
            raw, etag = retrying(self.retry_budget_s, f"read {url}", attempt)
        except BOTO_ERRORS as exc:
            if is_not_found(exc):
                return None
            raise self._download_error(url, exc) from exc
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DownloadError(f"record {url} is not valid JSON") from exc
        if not isinstance(record, dict):
            raise DownloadError(f"record {url} is not a JSON object")
        return record, etag

    def put_json(
        self,
        key: str,
        record: Mapping[str, Any],
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Write a JSON record, optionally as a compare-and-set.

        Args:
            key: The object key.
            record: A JSON-serialisable mapping.
            if_none_match: Create only (``If-None-Match: *``): fail if the object exists.
            if_match: Replace only this version (``If-Match: <etag>``).

        Returns:
            The new ETag.

        Raises:
            PreconditionFailedError: The condition did not hold (someone else wrote first).
            UploadError: The write failed for another reason.
            StorageUnavailableError: S3 stayed unreachable for the retry budget.
        """
        validate_key(key)
        url = self.s3_url(key)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": json.dumps(dict(record), sort_keys=True).encode("utf-8"),
            "ContentType": "application/json",
        }
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        try:
            response = retrying(self.retry_budget_s, f"write {url}", self.client.put_object, **args)
        except BOTO_ERRORS as exc:
            if is_precondition_failed(exc):
                raise PreconditionFailedError(f"{url} was written by someone else") from exc
            raise UploadError(f"could not write {url}: {describe(exc)}") from exc
        return str(response.get("ETag", ""))

    def delete_key(self, key: str, *, if_match: str | None = None) -> bool:
        """Delete one object, optionally only if it is still the given version.

        Returns:
            ``True`` when deleted (or already absent), ``False`` when ``if_match`` did not hold.

        Raises:
            UploadError: The deletion failed.
            StorageUnavailableError: S3 stayed unreachable for the retry budget.
        """
        validate_key(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match is not None:
            args["IfMatch"] = if_match
        try:
            retrying(
                self.retry_budget_s, f"delete {self.s3_url(key)}", self.client.delete_object, **args
            )
        except BOTO_ERRORS as exc:
            if is_precondition_failed(exc):
                return False
            if is_not_found(exc):
                return True
            raise UploadError(f"could not delete {self.s3_url(key)}: {describe(exc)}") from exc
        return True

    def head_bucket(self) -> None:
        """Check that the bucket exists and is reachable (``--check``), one attempt.

        Raises:
            DownloadError: It is missing, forbidden or unreachable (names the bucket).
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except BOTO_ERRORS as exc:
            raise DownloadError(f"bucket s3://{self.bucket}: {describe(exc)}") from exc
