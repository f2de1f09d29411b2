"""Training-job messages: parsing, validation, webhook allowlisting, and the values they set.

A message on the ``model_training`` queue is a JSON object such as::

    {"style_id": 42,
     "image_urls": ["s3://styles/42/a.png", "s3://styles/42/b.png"],
     "webhook_url": "http://backend:8000",
     "num_epochs": 20, "style_token": "sks style"}

:func:`parse_job` turns the raw body into a :class:`TrainingJob` or raises
:class:`~lightning_lora.errors.InvalidMessageError` (failure code ``INVALID_MESSAGE``) with a
message that names the offending field(s), e.g.
``invalid message: field 'image_urls.3': ...``. Error messages never echo the offending value,
so a hostile or huge message cannot flood the logs or the failure webhook.

:func:`peek_identity` recovers ``style_id`` and ``webhook_url`` from a broken message so that a
failure webhook can still be sent; the caller must still check the URL with
:func:`webhook_allowed` before calling it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lightning_lora.clients.contract import check_style_id, style_id_problem
from lightning_lora.clients.s3_names import s3_url_problem
from lightning_lora.errors import InvalidMessageError

DEFAULT_MAX_IMAGES = 100
"""Default maximum number of ``image_urls`` in one job (see :func:`parse_job`)."""
DEFAULT_MAX_BODY_BYTES = 1_000_000
"""Default maximum size of a message body in bytes."""
MAX_WEBHOOK_URL_LENGTH = 2048
MAX_CAPTION_LENGTH = 2000
MAX_CAPTION_KEY_LENGTH = 1024
MAX_STYLE_TOKEN_LENGTH = 64
MAX_JOB_ID_LENGTH = 128
MAX_REPORTED_ERRORS = 5
"""At most this many field errors are spelled out in an :class:`InvalidMessageError`."""

_PEEK_MAX_BYTES = 16 * 1024 * 1024
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DEFAULT_PORTS = {"http": 80, "https": 443}

NUMERIC_KEYS: dict[str, str] = {
    "num_epochs": "trainer.max_epochs",
    "learning_rate": "module.optimizer.lr",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "resolution": "data.resolution",
    "seed": "seed",
}
"""Numeric job field -> training config key set by :func:`job_settings` (in this order)."""


# --------------------------------------------------------------------------- field validators


def _check_no_control_chars(value: str, what: str) -> None:
    if _CONTROL_CHARS.search(value):
        raise ValueError(f"{what} must not contain control characters")


def check_s3_url(url: str) -> str:
    """Validate an ``s3://bucket/key`` URL (:func:`~.s3_names.s3_url_problem`'s rules).

    Args:
        url: The URL to check.

    Returns:
        The URL, unchanged.

    Raises:
        ValueError: Saying what is wrong (the field name is added by the schema); the URL
            itself is never echoed.
    """
    problem = s3_url_problem(url)
    if problem:
        raise ValueError(problem)
    return url


def check_webhook_url(url: str) -> str:
    """Validate a webhook base URL (``http``/``https`` with a host, no credentials).

    Args:
        url: The URL to check.

    Returns:
        The URL, unchanged.

    Raises:
        ValueError: If the URL is too long, has whitespace, control characters or backslashes,
            another scheme, no host, user info, or an invalid port.
    """
    if len(url) > MAX_WEBHOOK_URL_LENGTH:
        raise ValueError(f"URL is longer than {MAX_WEBHOOK_URL_LENGTH} characters")
    _check_no_control_chars(url, "URL")
    if any(ch.isspace() for ch in url) or "\\" in url:
        raise ValueError("URL must not contain whitespace or backslashes")
    parts = _split_http_url(url)
    if parts is None:
        raise ValueError("URL must be an http:// or https:// URL with a host and a valid port")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not contain user info")
    return url


def _check_style_token(token: str) -> str:
    if not token.strip():
        raise ValueError("style token must not be blank")
    _check_no_control_chars(token, "style token")
    return token


def _check_job_id(job_id: str) -> str:
    if not _JOB_ID_RE.fullmatch(job_id):
        raise ValueError("job id may only contain letters, digits, '.', '_' and '-'")
    return job_id


S3Url = Annotated[StrictStr, AfterValidator(check_s3_url)]
WebhookUrl = Annotated[StrictStr, AfterValidator(check_webhook_url)]
StyleToken = Annotated[
    StrictStr,
    Field(min_length=1, max_length=MAX_STYLE_TOKEN_LENGTH),
    AfterValidator(_check_style_token),
]
JobId = Annotated[
    StrictStr,
    Field(min_length=1, max_length=MAX_JOB_ID_LENGTH),
    AfterValidator(_check_job_id),
]


# --------------------------------------------------------------------------- the model


class TrainingJob(BaseModel):
    """One LoRA training job as sent by the backend.

    Validate with ``TrainingJob.model_validate(data, context={"max_images": n})`` (or use
    :func:`parse_job`); without a context the limit is :data:`DEFAULT_MAX_IMAGES`.

    Attributes:
        style_id: The backend's style id (strict positive int).
        image_urls: 1..max_images ``s3://bucket/key`` URLs of the training images.
        webhook_url: The backend's base URL (http/https); results are reported there.
        num_epochs: Optional override of ``trainer.max_epochs`` (1..10000).
        learning_rate: Optional override of ``module.optimizer.lr`` (0 < lr <= 1e-2).
        lora_rank: Optional override of ``lora.rank`` (1..256).
        lora_alpha: Optional override of ``lora.alpha`` (0 < alpha <= 1024).
        resolution: Optional override of ``data.resolution`` (64..2048, a multiple of 8).
        seed: Optional override of ``seed`` (0..2**32-1).
        captions: Optional captions: a dict file name -> caption, or a list aligned with
            ``image_urls``.
        style_token: Optional style token (1..64 chars) put into the caption template for
            images without a caption; written to the caption files as plain text, never into
            the config.
        job_id: Identifier of the job; defaults to ``style-<style_id>`` (deterministic, so a
            redelivered message maps to the same job and its checkpoints).
    """

    model_config = ConfigDict(extra="forbid")

    style_id: Annotated[StrictInt, AfterValidator(check_style_id)]
    image_urls: Annotated[list[S3Url], Field(min_length=1)]
    webhook_url: WebhookUrl
    num_epochs: Annotated[StrictInt, Field(ge=1, le=10_000)] | None = None
    learning_rate: Annotated[StrictFloat, Field(gt=0, le=1e-2, allow_inf_nan=False)] | None = None
    lora_rank: Annotated[StrictInt, Field(ge=1, le=256)] | None = None
    lora_alpha: Annotated[StrictFloat, Field(gt=0, le=1024, allow_inf_nan=False)] | None = None
    resolution: Annotated[StrictInt, Field(ge=64, le=2048, multiple_of=8)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**32 - 1)] | None = None
    captions: dict[str, str] | list[str] | None = None
    style_token: StyleToken | None = None
    job_id: JobId | None = None

    @field_validator("image_urls", mode="before")
    @classmethod
    def _limit_image_count(cls, value: Any, info: ValidationInfo) -> Any:
        """Reject too many URLs before validating each of them."""
        max_images = _max_images(info)
        if isinstance(value, list) and len(value) > max_images:
            raise ValueError(f"too many image URLs ({len(value)} > {max_images})")
        return value

    @field_validator("captions", mode="before")
    @classmethod
    def _check_captions(cls, value: Any, info: ValidationInfo) -> Any:
        """Validate captions by hand so that errors name the entry, not a union branch."""
        if value is None:
            return None
        if isinstance(value, dict):
            return _check_caption_dict(value, _max_images(info))
        if isinstance(value, list):
            return _check_caption_list(value, info.data.get("image_urls"))
        raise ValueError("captions must be an object (file name -> caption) or a list")

    @model_validator(mode="after")
    def _default_job_id(self) -> TrainingJob:
        """Derive ``job_id`` from ``style_id`` when it is not given."""
        if self.job_id is None:
            self.job_id = f"style-{self.style_id}"
        return self


def _max_images(info: ValidationInfo) -> int:
    context = info.context if isinstance(info.context, dict) else {}
    return int(context.get("max_images", DEFAULT_MAX_IMAGES))


def _check_caption(caption: Any, where: str) -> str:
    if not isinstance(caption, str):
        raise ValueError(f"{where} must be a string")
    if len(caption) > MAX_CAPTION_LENGTH:
        raise ValueError(f"{where} is longer than {MAX_CAPTION_LENGTH} characters")
    _check_no_control_chars(caption.replace("\n", " ").replace("\t", " "), where)
    return caption


def _check_caption_dict(value: dict[Any, Any], max_images: int) -> dict[str, str]:
    if len(value) > max_images:
        raise ValueError(f"too many captions ({len(value)} > {max_images})")
    for index, (name, caption) in enumerate(value.items()):
        if not isinstance(name, str) or not name or len(name) > MAX_CAPTION_KEY_LENGTH:
            raise ValueError(f"caption key #{index} must be a file name of 1..1024 characters")
        _check_no_control_chars(name, f"caption key #{index}")
        _check_caption(caption, f"caption #{index}")
    return value


def _check_caption_list(value: list[Any], image_urls: Any) -> list[str]:
    if isinstance(image_urls, list) and len(value) != len(image_urls):
        raise ValueError(
            f"a caption list must have one entry per image URL ({len(value)} != {len(image_urls)})"
        )
    for index, caption in enumerate(value):
        _check_caption(caption, f"caption #{index}")
    return value


# --------------------------------------------------------------------------- parsing


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:64]!r}")
        result[key] = value
    return result


def _load_json(body: bytes) -> Any:
    """Decode UTF-8 JSON strictly (no NaN/Infinity, no duplicate keys)."""
    text = body.decode("utf-8")
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


class _Duplicates(dict[str, Any]):
    """A JSON object that remembers which of its keys were given twice (the last value wins)."""

    duplicates: list[str]


def _lenient_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = _Duplicates()
    result.duplicates = []
    for key, value in pairs:
        if key in result:
            result.duplicates.append(key)
        result[key] = value
    return result


def _load_python_json(body: bytes) -> Any:
    """Decode the JSON dialect Python's ``json.dumps`` writes: ``NaN``/``Infinity``, repeated keys.

    Only for naming what is wrong with a refused message and for recovering its identity; a
    job is never built from it.
    """
    return json.loads(body.decode("utf-8"), object_pairs_hook=_lenient_pairs)


def _near_json_problems(value: Any, path: str = "") -> list[str]:
    """Where a leniently parsed body holds what strict JSON has not, as ``field ...`` lines."""
    problems: list[str] = []
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"field '{path or '<message>'}': not a finite number ({value!r})")
    elif isinstance(value, dict):
        for key in getattr(value, "duplicates", []):
            problems.append(f"field '{_join(path, key)}': given more than once")
        for key, item in value.items():
            problems.extend(_near_json_problems(item, _join(path, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problems.extend(_near_json_problems(item, _join(path, str(index))))
    return problems


def _join(path: str, key: str) -> str:
    return f"{path}.{key[:64]}" if path else key[:64]


def _field_name(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<message>"


def _describe_error(error: Any) -> str:
    name = _field_name(tuple(error.get("loc", ())))
    kind = error.get("type")
    if kind == "extra_forbidden":
        return f"field '{name}': unknown field"
    if kind == "missing":
        return f"field '{name}': required field is missing"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"field '{name}': {message}"


def _invalid_from_validation(exc: ValidationError) -> InvalidMessageError:
    errors = exc.errors(include_url=False, include_input=False)
    parts = [_describe_error(error) for error in errors[:MAX_REPORTED_ERRORS]]
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"... and {len(errors) - MAX_REPORTED_ERRORS} more")
    return InvalidMessageError("invalid message: " + "; ".join(parts))


def parse_job(
    body: bytes,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> TrainingJob:
    """Parse and validate a raw queue message.

    Args:
        body: The message body.
        max_images: Maximum number of ``image_urls``.
        max_body_bytes: Maximum body size in bytes.

    Returns:
        The validated job.

    Raises:
        InvalidMessageError: If the body is too large, not UTF-8, not JSON, not a JSON object,
            or any field is missing, unknown, of the wrong type or out of range. The message
            names the offending field(s), e.g. ``invalid message: field 'image_urls.3': ...``.
    """
    if len(body) > max_body_bytes:
        raise InvalidMessageError(
            f"invalid message: body is {len(body)} bytes, more than the limit of {max_body_bytes}"
        )
    try:
        data = _load_json(body)
    except UnicodeDecodeError as exc:
        raise InvalidMessageError(f"invalid message: body is not UTF-8 ({exc.reason})") from None
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InvalidMessageError(
            f"invalid message: body is not valid JSON ({_strict_json_problem(body, reason)})"
        ) from None
    if not isinstance(data, dict):
        raise InvalidMessageError(
            f"invalid message: body must be a JSON object, not a JSON {_json_kind(data)}"
        )
    try:
        return TrainingJob.model_validate(data, context={"max_images": max_images})
    except ValidationError as exc:
        raise _invalid_from_validation(exc) from None


def _strict_json_problem(body: bytes, reason: str) -> str:
    """Why strict JSON refused ``body``: the fields Python's dialect allowed, else ``reason``."""
    try:
        problems = _near_json_problems(_load_python_json(body))
    except (ValueError, RecursionError):
        return reason
    if not problems:
        return reason
    shown = problems[:MAX_REPORTED_ERRORS]
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; ... and {more} more" if more > 0 else "")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def peek_identity(body: bytes) -> tuple[int | None, str | None]:
    """Best-effort extraction of ``style_id`` and ``webhook_url`` from a (broken) message.

    Used to report an ``INVALID_MESSAGE`` failure to the backend. The body is read in Python's
    JSON dialect (``NaN``, ``Infinity``, repeated keys: the last wins), which the backend's
    ``json.dumps`` writes for a float that is not finite. Each value is returned only
    if it is individually valid (a positive int, an http/https URL); the caller must still
    check the URL with :func:`webhook_allowed`. Never raises.

    Args:
        body: The raw message body.

    Returns:
        ``(style_id, webhook_url)``, each ``None`` when not recoverable.
    """
    if len(body) > _PEEK_MAX_BYTES:
        return None, None
    try:  # Python's own dialect too: a NaN elsewhere must not silence the failure report
        data = json.loads(body.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    style_id = data.get("style_id")
    if style_id_problem(style_id) is not None:
        style_id = None
    webhook_url = data.get("webhook_url")
    if isinstance(webhook_url, str):
        try:
            check_webhook_url(webhook_url)
        except ValueError:
            webhook_url = None
    else:
        webhook_url = None
    return style_id, webhook_url


# --------------------------------------------------------------------------- webhook allowlist


def _split_http_url(url: str) -> SplitResult | None:
    """Split an http(s) URL; ``None`` if the scheme, host or port is unusable."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on an invalid port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts


def _normalize_host(host: str) -> str:
    return host.lower().rstrip(".")


def _effective_port(parts: SplitResult) -> int:
    return parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]


def _path_allowed(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _entry_matches(entry: str, url: SplitResult) -> bool:
    """Whether one allowlist entry (host, host:port or base URL) admits the parsed URL."""
    entry = entry.strip()
    if not entry:
        return False
    host = _normalize_host(url.hostname or "")
    if "://" in entry:
        allowed = _split_http_url(entry)
        if allowed is None or allowed.username is not None or allowed.password is not None:
            return False
        return (
            allowed.scheme == url.scheme
            and _normalize_host(allowed.hostname or "") == host
            and _effective_port(allowed) == _effective_port(url)
            and _path_allowed(url.path, allowed.path)
        )
    try:
        allowed = urlsplit("//" + entry)
        allowed_port = allowed.port
    except ValueError:
        return False
    if not allowed.hostname or allowed.path or allowed.query or allowed.fragment:
        return False
    if allowed.username is not None or allowed.password is not None:
        return False
    if _normalize_host(allowed.hostname) != host:
        return False
    return allowed_port is None or allowed_port == _effective_port(url)


def webhook_allowed(url: str, allowlist: list[str]) -> bool:
    """Whether a webhook URL may be called.

    Entries are hostnames (``backend``, ``127.0.0.1``: any port, http or https),
    ``host:port`` (http or https on that port) or base URLs (``http://backend:8000``: that
    scheme, host and port, and, if the entry has a path, URLs under that path). Hosts, ports and
    schemes are compared exactly after parsing, so ``http://backend.evil.com``,
    ``http://backend@evil.com`` and ``http://evil.com/?backend`` do not match ``backend``. URLs
    with user info, whitespace, control characters or backslashes are never allowed.

    Args:
        url: The webhook URL from the message.
        allowlist: Allowed hosts, ``host:port`` pairs or base URLs; empty allows nothing.

    Returns:
        True if the URL is well formed and matches an entry.
    """
    if not allowlist:
        return False
    try:
        check_webhook_url(url)
    except ValueError:
        return False
    parts = _split_http_url(url)
    if parts is None:
        return False
    return any(_entry_matches(entry, parts) for entry in allowlist)


# --------------------------------------------------------------------------- job -> config


def job_settings(job: TrainingJob) -> dict[str, int | float]:
    """The config values a job sets: its numeric fields, by config key.

    Only numbers go into the training config, as values (never as override strings, so they
    are never parsed or resolved). Text from a message (``style_token``, ``captions``) never
    enters the config: the worker writes it into the job's caption files as plain text.

    Args:
        job: A validated job.

    Returns:
        E.g. ``{"trainer.max_epochs": 20, "module.optimizer.lr": 1e-4}``, in the order of
        :data:`NUMERIC_KEYS`, for the fields present in the job.
    """
    values: dict[str, int | float] = {}
    for field_name, key in NUMERIC_KEYS.items():
        value = getattr(job, field_name)
        if value is not None:
            values[key] = value
    return values
