"""The worker's settings: one schema, from ``configs/worker.yaml`` and the environment.

:class:`WorkerSettings` is a pydantic model. Values come from the ``worker:`` section of the
composed worker config (command-line overrides included) and from environment variables, which
win (12-factor deployments set the environment); :func:`load_settings` merges the two by hand
rather than through pydantic-settings, because the lists from the environment extend the
config's instead of replacing them. Lists from the environment
(``WEBHOOK_ALLOWLIST``, ``S3_ALLOWED_BUCKETS``) are comma-separated and *extend* the config's.
Every value is checked before the worker consumes anything; a bad one stops the worker with a
message naming the setting (:func:`load_settings`).

Secrets (``INTERNAL_API_TOKEN``, ``WEBHOOK_SIGNING_SECRET``) are :class:`pydantic.SecretStr`:
they never appear in ``repr``, ``model_dump`` or logs, and are registered for redaction.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from lightning_lora.worker.messages import check_webhook_url

__all__ = ["SettingsError", "WorkerSettings", "load_settings"]

# what `requests` accepts in a header value: no CR/LF/NUL, no leading whitespace
_HEADER_VALUE_RE = re.compile(r"^[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], Field(default_factory=list)]


class WorkerSettings(BaseModel):
    """What the worker needs besides the broker (see ``configs/worker.yaml``).

    Attributes:
        internal_api_token: The backend's bearer token (``INTERNAL_API_TOKEN``), required;
            surrounding whitespace (a secret file's newline) is stripped.
        webhook_signing_secret: HMAC secret for ``webhook-signature``
            (``WEBHOOK_SIGNING_SECRET``), optional.
        webhook_allowlist: Hosts, ``host:port`` or base URLs a job's webhook may target
            (``WEBHOOK_ALLOWLIST``); must not be empty.
        allowed_buckets: Buckets images may come from (``S3_ALLOWED_BUCKETS``; empty: any).
        s3_bucket: The bucket for checkpoints, state and models (``S3_BUCKET``).
        s3_retry_budget_s: Seconds each S3 operation retries transient failures
            (``S3_RETRY_BUDGET_S``); past it the job is requeued, not failed.
        max_images: Most image URLs per job.
        max_image_bytes: Largest image file.
        max_total_bytes: Largest total download per job.
        max_message_bytes: Largest message body.
        grace_period_s: Time a running job gets to checkpoint on shutdown.
        work_dir: Parent of the per-job folders (``None``: system temp).
        resume_from_s3: Resume a redelivered job from its newest S3 checkpoint.
        lease_ttl_s: How long a job's lease lasts without renewal (renewed every third).
        outbox_window_s: How long an unacknowledged terminal webhook is re-sent (24 h).
        outbox_poll_s: Seconds between two scans of the outbox.
        outbox_backoff_base_s: First re-send delay of the outbox (then x3 each time).
        outbox_backoff_max_s: Largest re-send delay of the outbox.
        metrics_port: Port of the health and Prometheus endpoint (``METRICS_PORT``; off when
            unset).
        metrics_host: Address it binds (``METRICS_HOST``, default ``127.0.0.1``).
        log_format: ``text`` or ``json`` (``LOG_FORMAT``).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    internal_api_token: SecretStr = Field(
        validation_alias=AliasChoices("INTERNAL_API_TOKEN", "internal_api_token")
    )
    webhook_signing_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("WEBHOOK_SIGNING_SECRET", "webhook_signing_secret"),
    )
    webhook_allowlist: CommaList
    allowed_buckets: CommaList
    s3_bucket: str = Field(
        default="stylelicense-models", validation_alias=AliasChoices("S3_BUCKET", "s3_bucket")
    )
    s3_retry_budget_s: float = Field(
        default=300.0,
        ge=0,
        validation_alias=AliasChoices("S3_RETRY_BUDGET_S", "s3_retry_budget_s"),
    )
    max_images: int = Field(default=100, ge=1, le=10_000)
    max_image_bytes: int = Field(default=20_000_000, ge=1)
    max_total_bytes: int = Field(default=500_000_000, ge=1)
    max_message_bytes: int = Field(default=1_000_000, ge=1_000, le=128_000_000)
    grace_period_s: float = Field(default=120.0, ge=0)
    work_dir: str | None = None
    resume_from_s3: bool = True
    lease_ttl_s: float = Field(default=60.0, gt=0)
    outbox_window_s: float = Field(default=86_400.0, gt=0)
    outbox_poll_s: float = Field(default=10.0, gt=0)
    outbox_backoff_base_s: float = Field(default=5.0, gt=0)
    outbox_backoff_max_s: float = Field(default=7_200.0, gt=0)
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("METRICS_PORT", "metrics_port"),
    )
    metrics_host: str = Field(
        default="127.0.0.1", validation_alias=AliasChoices("METRICS_HOST", "metrics_host")
    )
    log_format: Literal["text", "json"] = Field(
        default="text", validation_alias=AliasChoices("LOG_FORMAT", "log_format")
    )

    @field_validator("internal_api_token", "webhook_signing_secret", mode="before")
    @classmethod
    def _strip_header_value(cls, value: Any) -> Any:
        """Strip a secret's surrounding whitespace and refuse what can't be a header value."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise ValueError("must not be empty")
            if not _HEADER_VALUE_RE.match(value):
                raise ValueError("contains characters that can't be sent in an HTTP header")
        return value

    @field_validator("webhook_allowlist", "allowed_buckets", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("webhook_allowlist")
    @classmethod
    def _check_allowlist(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("is empty: every job would be refused (set WEBHOOK_ALLOWLIST)")
        for entry in value:
            if "://" in entry:
                try:
                    check_webhook_url(entry)
                except ValueError as exc:
                    raise ValueError(f"entry {entry!r}: {exc}") from None
            elif any(ch.isspace() for ch in entry) or "/" in entry or "@" in entry:
                raise ValueError(f"entry {entry!r} is not a host, host:port or base URL")
        return value

    @field_validator("s3_bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        if not _BUCKET_RE.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not a valid bucket name")
        return value

    @field_validator("max_total_bytes")
    @classmethod
    def _check_total(cls, value: int, info: Any) -> int:
        per_file = info.data.get("max_image_bytes")
        if per_file is not None and value < per_file:
            raise ValueError("must be at least max_image_bytes")
        return value

    def secrets(self) -> list[str]:
        """The secret values held, for redaction."""
        held = [self.internal_api_token, self.webhook_signing_secret]
        return [s.get_secret_value() for s in held if s is not None]

    def public(self) -> dict[str, Any]:
        """The settings without secrets, for the start-up log line."""
        return self.model_dump(exclude={"internal_api_token", "webhook_signing_secret"})


def load_settings(
    section: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> WorkerSettings:
    """Settings from the config's ``worker:`` section and the environment (which wins).

    ``WEBHOOK_ALLOWLIST`` and ``S3_ALLOWED_BUCKETS`` extend the config's lists.

    Args:
        section: The ``worker:`` section as plain data (``limits`` may nest the ``max_*``).
        env: The environment (``os.environ`` when ``None``).

    Raises:
        SettingsError: Naming every invalid or missing setting.
    """
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = dict(section or {})
    values.update(values.pop("limits", None) or {})
    for name, env_name in (
        ("webhook_allowlist", "WEBHOOK_ALLOWLIST"),
        ("allowed_buckets", "S3_ALLOWED_BUCKETS"),
    ):
        values[name] = [*(_split_list(values.get(name)) or []), *_split_list(env.get(env_name, ""))]
    for name, env_name in (
        ("internal_api_token", "INTERNAL_API_TOKEN"),
        ("webhook_signing_secret", "WEBHOOK_SIGNING_SECRET"),
        ("s3_bucket", "S3_BUCKET"),
        ("s3_retry_budget_s", "S3_RETRY_BUDGET_S"),
        ("metrics_port", "METRICS_PORT"),
        ("metrics_host", "METRICS_HOST"),
        ("log_format", "LOG_FORMAT"),
    ):
        if env.get(env_name, "") != "":
            values[name] = env[env_name]
    values = {k: v for k, v in values.items() if v is not None or k == "work_dir"}
    try:
        return WorkerSettings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            name = ".".join(str(part) for part in error.get("loc", ())) or "settings"
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{_setting_name(name)}: {message}")
        raise SettingsError("invalid worker settings: " + "; ".join(problems)) from None


_ENV_NAMES = {
    "internal_api_token": "INTERNAL_API_TOKEN",
    "webhook_signing_secret": "WEBHOOK_SIGNING_SECRET",
    "webhook_allowlist": "worker.webhook_allowlist / WEBHOOK_ALLOWLIST",
    "allowed_buckets": "worker.allowed_buckets / S3_ALLOWED_BUCKETS",
    "s3_bucket": "S3_BUCKET",
    "s3_retry_budget_s": "S3_RETRY_BUDGET_S",
    "metrics_port": "METRICS_PORT",
    "metrics_host": "METRICS_HOST",
    "log_format": "LOG_FORMAT",
}


def _setting_name(field: str) -> str:
    """The name a user sets: the environment variable, or the ``worker.*`` config key."""
    root = field.split(".")[0]
    if root.isupper():
        return root
    return _ENV_NAMES.get(root, f"worker.{field}")
