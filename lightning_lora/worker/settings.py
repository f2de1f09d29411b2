"""The worker's settings: one schema, from ``configs/worker.yaml`` and the environment.

:class:`WorkerSettings` is a pydantic model. Values come from the ``worker:`` section of the
composed worker config (command-line overrides included) and from environment variables, which
win (12-factor deployments set the environment); :func:`load_settings` merges the two by hand
rather than through pydantic-settings, because the lists from the environment extend the
config's instead of replacing them. Lists from the environment
(``WEBHOOK_ALLOWLIST``, ``S3_ALLOWED_BUCKETS``) are comma-separated and *extend* the config's.
Every value is checked before the worker consumes anything; a bad one stops the worker with a
message naming the setting (:func:`load_settings`).

:class:`BrokerSettings` (how to reach RabbitMQ, from the ``RABBITMQ_*`` variables) is a pydantic
model of the same kind, held by :class:`WorkerSettings` as ``broker`` and checked in the same
pass, so one :class:`SettingsError` names every bad setting of either.

Secrets (``INTERNAL_API_TOKEN``, ``WEBHOOK_SIGNING_SECRET``, ``RABBITMQ_PASSWORD``,
``RABBITMQ_URL``) are :class:`pydantic.SecretStr` or kept out of ``repr``: they never appear in
``repr``, ``model_dump`` or logs, and are registered for redaction.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import quote

import pika
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from lightning_lora.clients.s3_names import bucket_problem
from lightning_lora.clients.s3_retry import DEFAULT_RETRY_BUDGET_S
from lightning_lora.clients.storage import DEFAULT_BUCKET, S3_ENV
from lightning_lora.worker.messages import check_webhook_url

__all__ = [
    "BROKER_ENV",
    "DEFAULT_QUEUE",
    "LIST_ENV",
    "WORKER_ENV",
    "BrokerSettings",
    "SettingsError",
    "WorkerSettings",
    "load_settings",
]

DEFAULT_QUEUE = "model_training"

# what `requests` accepts in a header value: no CR/LF/NUL, no leading whitespace
_HEADER_VALUE_RE = re.compile(r"^[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


# The environment, once: each setting's variable(s) (the first one set wins). The defaults are the
# models' field defaults.
BROKER_ENV: dict[str, str] = {
    "host": "RABBITMQ_HOST",
    "port": "RABBITMQ_PORT",
    "user": "RABBITMQ_USER",
    "password": "RABBITMQ_PASSWORD",
    "vhost": "RABBITMQ_VHOST",
    "url": "RABBITMQ_URL",
    "heartbeat": "RABBITMQ_HEARTBEAT",
    "queue": "RABBITMQ_QUEUE",
    "dead_letter_queue": "RABBITMQ_DLQ",
    "cancel_queue": "RABBITMQ_CANCEL_QUEUE",
    "delivery_limit": "RABBITMQ_DELIVERY_LIMIT",
    "queue_type": "RABBITMQ_QUEUE_TYPE",
    "connection_name": "RABBITMQ_CONNECTION_NAME",
}
"""The variable of each :class:`BrokerSettings` field."""

WORKER_ENV: dict[str, tuple[str, ...]] = {
    "internal_api_token": ("INTERNAL_API_TOKEN",),
    "webhook_signing_secret": ("WEBHOOK_SIGNING_SECRET",),
    "s3_bucket": S3_ENV["bucket"],
    "s3_endpoint_url": S3_ENV["endpoint_url"],
    "s3_retry_budget_s": S3_ENV["retry_budget_s"],
    "metrics_port": ("METRICS_PORT",),
    "metrics_host": ("METRICS_HOST",),
    "log_format": ("LOG_FORMAT",),
}
"""The variable(s) of each scalar :class:`WorkerSettings` field; they win over the config."""

LIST_ENV: dict[str, str] = {
    "webhook_allowlist": "WEBHOOK_ALLOWLIST",
    "allowed_buckets": "S3_ALLOWED_BUCKETS",
}
"""The comma-separated variable of each list field; it extends the config's list."""


class BrokerSettings(BaseModel):
    """How to reach RabbitMQ and which queues to use.

    Read them from the environment with :meth:`from_env` (or as ``WorkerSettings.broker`` via
    :func:`load_settings`). The password (and the URL, which may contain it) never appears in
    ``repr`` or in logs; use :meth:`describe` for a safe summary.

    Note:
        There is no consumer-timeout setting: RabbitMQ 3.10 ignores the per-queue
        ``x-consumer-timeout`` argument; configure the broker-wide ``consumer_timeout`` instead.

    Attributes:
        host: Broker host (``RABBITMQ_HOST``, default ``localhost``).
        port: Broker port (``RABBITMQ_PORT``, default 5672).
        user: User name (``RABBITMQ_USER``, default ``guest``).
        password: Password (``RABBITMQ_PASSWORD``, default ``guest``); never logged.
        vhost: Virtual host (``RABBITMQ_VHOST``, default ``/``).
        url: Full ``amqp://`` / ``amqps://`` URL (``RABBITMQ_URL``); when set it wins over the
            discrete fields for connecting (TLS options included). Never logged.
        heartbeat: Heartbeat interval in seconds (``RABBITMQ_HEARTBEAT``, default 60).
        queue: Work queue (``RABBITMQ_QUEUE``, default ``model_training``).
        dead_letter_queue: Dead-letter queue (``RABBITMQ_DLQ``, default ``<queue>.dlq``).
        cancel_queue: The backend's cancel messages (``RABBITMQ_CANCEL_QUEUE``, default
            ``<queue>.cancel``; plain and durable like the work queue).
        delivery_limit: Attempts after which a job is poison (``RABBITMQ_DELIVERY_LIMIT``,
            default 3): counted in the job's S3 lease (crashes), or the quorum queue's
            ``x-delivery-count``; also the quorum queue's ``x-delivery-limit``.
        queue_type: ``classic`` (default: declared exactly as the backend does) or ``quorum``
            (``RABBITMQ_QUEUE_TYPE``).
        connection_name: ``connection_name`` client property shown by the broker
            (``RABBITMQ_CONNECTION_NAME``, default ``lightning_lora-worker``).
        blocked_connection_timeout: Seconds a connection blocked by a broker alarm may wait.
        reconnect_initial_delay: First reconnect delay in seconds (before jitter).
        reconnect_max_delay: Upper bound of the reconnect delay in seconds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="localhost", min_length=1)
    port: int = Field(default=5672, gt=0, lt=65536)
    user: str = "guest"
    password: SecretStr = SecretStr("guest")
    vhost: str = "/"
    url: str | None = Field(default=None, repr=False)
    heartbeat: int = Field(default=60, ge=0)
    queue: str = DEFAULT_QUEUE
    dead_letter_queue: str | None = None
    cancel_queue: str | None = None
    delivery_limit: int = Field(default=3, ge=1)
    queue_type: Literal["classic", "quorum"] = "classic"
    connection_name: str = "lightning_lora-worker"
    blocked_connection_timeout: float = Field(default=300.0, gt=0)
    reconnect_initial_delay: float = Field(default=1.0, gt=0)
    reconnect_max_delay: float = Field(default=30.0, gt=0)

    @field_validator("queue", "dead_letter_queue", "cancel_queue")
    @classmethod
    def _check_queue_name(cls, value: str | None) -> str | None:
        if value is not None and not 0 < len(value.encode()) <= 255:
            raise ValueError("a queue name must be 1..255 bytes")
        return value

    @field_validator("queue_type", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _fields_from_url(cls, values: Any) -> Any:
        """With ``url`` set, host, port, user, password, vhost and heartbeat come from it."""
        if not isinstance(values, dict) or not values.get("url"):
            return values
        try:
            params = pika.URLParameters(values["url"])
        except Exception as exc:  # pika raises several types for bad URLs
            raise ValueError(f"is not a valid AMQP URL ({type(exc).__name__})") from None
        fields: dict[str, Any] = {
            "host": params.host,
            "port": params.port,
            "vhost": params.virtual_host,
        }
        if isinstance(params.credentials, pika.PlainCredentials):
            fields["user"] = params.credentials.username
            fields["password"] = params.credentials.password
        if isinstance(params.heartbeat, int) and "heartbeat" not in values:
            fields["heartbeat"] = params.heartbeat
        return {**values, **fields}

    @property
    def dlq(self) -> str:
        """The dead-letter queue name (``<queue>.dlq`` unless set)."""
        return self.dead_letter_queue or f"{self.queue}.dlq"

    @property
    def cancels(self) -> str:
        """The cancel queue name (``<queue>.cancel`` unless set)."""
        return self.cancel_queue or f"{self.queue}.cancel"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> BrokerSettings:
        """Build settings from the ``RABBITMQ_*`` environment variables.

        Args:
            env: Variables to read; defaults to ``os.environ``.
            **overrides: Field values that win over the environment.

        Returns:
            The settings.

        Raises:
            SettingsError: Naming each variable that is invalid (never its value).
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            name: env[var] for name, var in BROKER_ENV.items() if env.get(var, "").strip() != ""
        }
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise SettingsError(
                "invalid broker settings: " + _problems(exc, _broker_name)
            ) from None

    def replace(self, **changes: Any) -> BrokerSettings:
        """Return a validated copy with some fields changed."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**values, **changes})

    def connection_parameters(
        self, connection_name: str | None = None
    ) -> pika.ConnectionParameters:
        """Build pika connection parameters.

        Args:
            connection_name: ``connection_name`` client property; defaults to
                :attr:`connection_name`.

        Returns:
            Parameters with our heartbeat, timeouts and client properties.
        """
        name = connection_name or self.connection_name
        params: pika.ConnectionParameters
        if self.url:
            params = pika.URLParameters(self.url)
        else:
            params = pika.ConnectionParameters(
                host=self.host,
                port=self.port,
                virtual_host=self.vhost,
                credentials=pika.PlainCredentials(self.user, self.password.get_secret_value()),
            )
        params.heartbeat = self.heartbeat
        params.blocked_connection_timeout = self.blocked_connection_timeout
        params.connection_attempts = 1
        params.client_properties = {"connection_name": name, "product": "lightning_lora"}
        return params

    def describe(self) -> str:
        """A log-safe description of the broker endpoint (no password)."""
        scheme = "amqps" if (self.url or "").startswith("amqps://") else "amqp"
        vhost = quote(self.vhost, safe="")
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{vhost} queue={self.queue!r}"

    def secrets(self) -> list[str]:
        """The secret values held (password, URL), for redaction."""
        return [v for v in (self.password.get_secret_value(), self.url) if v]


def _broker_name(field: str) -> str:
    root = field.split(".")[0]
    return BROKER_ENV.get(root, f"broker.{field}") if root != "settings" else "RABBITMQ_URL"


def _problems(exc: ValidationError, name_of: Any) -> str:
    """Each error of ``exc`` as ``<setting>: <message>``, never with the value given."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        name = ".".join(str(part) for part in error.get("loc", ())) or "settings"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{name_of(name)}: {message}")
    return "; ".join(problems)


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
        s3_endpoint_url: An S3-compatible endpoint (``S3_ENDPOINT_URL``, else
            ``AWS_ENDPOINT_URL``; AWS itself when unset).
        s3_retry_budget_s: Seconds each S3 operation retries transient failures
            (``S3_RETRY_BUDGET_S``); past it the job is requeued, not failed.
        max_images: Most image URLs per job.
        max_image_bytes: Largest image file.
        max_total_bytes: Largest total download per job.
        max_message_bytes: Largest message body.
        grace_period_s: Time a running job gets to checkpoint on shutdown.
        work_dir: Parent of the per-job folders (``None``: system temp).
        resume_from_s3: Resume a redelivered job from its newest S3 checkpoint.
        require_conditional_writes: Refuse to start on a store that ignores ``If-None-Match`` or
            ``If-Match`` (exactly-once rests on them); ``False`` runs with a warning.
        lease_ttl_s: How long a job's lease lasts without renewal (renewed every third).
        cancel_poll_s: Seconds between two looks of a running job at its style's cancel record.
        cancel_margin_s: A cancel also stops the style's runs that began this long after its
            barrier came out of the queue (jobs taken at that moment, store clocks).
        outbox_window_s: How long an unacknowledged terminal webhook is re-sent (24 h).
        outbox_poll_s: Seconds between two scans of the outbox.
        outbox_backoff_base_s: First re-send delay of the outbox (then x3 each time).
        outbox_backoff_max_s: Largest re-send delay of the outbox.
        metrics_port: Port of the health and Prometheus endpoint (``METRICS_PORT``; off when
            unset).
        metrics_host: Address it binds (``METRICS_HOST``, default ``127.0.0.1``).
        log_format: ``text`` or ``json`` (``LOG_FORMAT``).
        broker: How to reach RabbitMQ (the ``RABBITMQ_*`` variables, :class:`BrokerSettings`).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    internal_api_token: SecretStr
    webhook_signing_secret: SecretStr | None = None
    webhook_allowlist: CommaList
    allowed_buckets: CommaList
    s3_bucket: str = DEFAULT_BUCKET
    s3_endpoint_url: str | None = None
    s3_retry_budget_s: float = Field(default=DEFAULT_RETRY_BUDGET_S, ge=0)
    max_images: int = Field(default=100, ge=1, le=10_000)
    max_image_bytes: int = Field(default=20_000_000, ge=1)
    max_total_bytes: int = Field(default=500_000_000, ge=1)
    max_message_bytes: int = Field(default=1_000_000, ge=1_000, le=128_000_000)
    grace_period_s: float = Field(default=120.0, ge=0)
    work_dir: str | None = None
    resume_from_s3: bool = True
    require_conditional_writes: bool = True
    lease_ttl_s: float = Field(default=60.0, gt=0)
    cancel_poll_s: float = Field(default=2.0, gt=0)
    cancel_margin_s: float = Field(default=10.0, ge=0)
    outbox_window_s: float = Field(default=86_400.0, gt=0)
    outbox_poll_s: float = Field(default=10.0, gt=0)
    outbox_backoff_base_s: float = Field(default=5.0, gt=0)
    outbox_backoff_max_s: float = Field(default=7_200.0, gt=0)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_format: Literal["text", "json"] = "text"
    broker: BrokerSettings = Field(default_factory=BrokerSettings)

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
        problem = bucket_problem(value)  # the one bucket rule, S3Storage's too
        if problem:
            raise ValueError(f"{value!r}: {problem}")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("max_total_bytes")
    @classmethod
    def _check_total(cls, value: int, info: Any) -> int:
        per_file = info.data.get("max_image_bytes")
        if per_file is not None and value < per_file:
            raise ValueError("must be at least max_image_bytes")
        return value

    def secrets(self) -> list[str]:
        """The secret values held (the broker's included), for redaction."""
        held = [self.internal_api_token, self.webhook_signing_secret]
        return [s.get_secret_value() for s in held if s is not None] + self.broker.secrets()

    def public(self) -> dict[str, Any]:
        """The settings without secrets, for the start-up log line."""
        public = self.model_dump(exclude={"internal_api_token", "webhook_signing_secret", "broker"})
        return {**public, "broker": self.broker.describe()}


def load_settings(
    section: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> WorkerSettings:
    """Settings from the config's ``worker:`` section and the environment (which wins).

    The broker's come from the ``RABBITMQ_*`` variables (:meth:`BrokerSettings.from_env`).

    ``WEBHOOK_ALLOWLIST`` and ``S3_ALLOWED_BUCKETS`` extend the config's lists.

    Args:
        section: The ``worker:`` section as plain data (``limits`` may nest the ``max_*``).
        env: The environment (``os.environ`` when ``None``).

    Raises:
        SettingsError: Naming every invalid or missing setting, the broker's included.
    """
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = dict(section or {})
    values.update(values.pop("limits", None) or {})
    for name, variable in LIST_ENV.items():
        values[name] = [*(_split_list(values.get(name)) or []), *_split_list(env.get(variable, ""))]
    for name, variables in WORKER_ENV.items():
        found = next((env[v] for v in variables if env.get(v, "") != ""), None)
        if found is not None:
            values[name] = found
    values = {k: v for k, v in values.items() if v is not None or k == "work_dir"}
    problems = []
    try:
        values["broker"] = BrokerSettings.from_env(env)
    except SettingsError as exc:
        problems.append(str(exc).removeprefix("invalid broker settings: "))
        values.pop("broker", None)
    try:
        settings = WorkerSettings.model_validate(values)
    except ValidationError as exc:
        problems.insert(0, _problems(exc, _setting_name))
    if problems:
        raise SettingsError("invalid worker settings: " + "; ".join(problems)) from None
    return settings


def _setting_name(field: str) -> str:
    """The name a user sets: the environment variable, or the ``worker.*`` config key."""
    root = field.split(".")[0]
    if root in WORKER_ENV:
        return WORKER_ENV[root][0]
    if root in LIST_ENV:
        return f"worker.{root} / {LIST_ENV[root]}"
    return f"worker.{field}"
