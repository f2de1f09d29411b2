"""Operations endpoint of the worker: Prometheus metrics, liveness and readiness.

:class:`WorkerMetrics` holds the worker's metrics in its own
:class:`~prometheus_client.CollectorRegistry` (never the global one, so several can live in one
process). The worker calls its methods as jobs run; the consumer calls
:meth:`WorkerMetrics.broker_seen` on every heartbeat or I/O with the broker.

:func:`serve_ops` starts an :class:`OpsServer`: a small threaded HTTP server (off unless the
worker is given a port) answering

* ``GET /metrics``: the metrics in the Prometheus text format (or OpenMetrics, when asked);
* ``GET /healthz``: ``200 ok`` while the process serves (liveness);
* ``GET /readyz``: ``200 ready`` when the readiness check passes, else ``503`` with a reason;
* anything else: ``404``.

Example::

    metrics = WorkerMetrics()
    server = serve_ops(metrics, port=9100, ready=lambda: consumer.connected
                       and metrics.broker_seen_within(60.0))
    ...
    server.stop()
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from typing_extensions import override

__all__ = [
    "DURATION_BUCKETS_S",
    "METRIC_PREFIX",
    "OpsServer",
    "ReadyCheck",
    "WorkerMetrics",
    "serve_ops",
]

log = logging.getLogger(__name__)

METRIC_PREFIX = "lightning_lora_worker"

DURATION_BUCKETS_S: tuple[float, ...] = (
    *(1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 2700, 3600),
    *(5400, 7200, 10800, 14400, 21600, 28800, 43200, math.inf),
)
"""Job duration buckets, in seconds: from a job refused in a second to a half-day training."""

ReadyCheck = Callable[[], bool | tuple[bool, str]]
"""A readiness check: ``True``/``False``, or ``(ready, reason)`` to say why it is not ready."""


class WorkerMetrics:
    """The worker's Prometheus metrics, in a registry of their own.

    All methods are thread-safe and cheap; call them from the consumer and job threads.

    Metrics (all prefixed ``lightning_lora_worker_``):

    * ``jobs_started_total``, ``jobs_completed_total``, ``jobs_requeued_total``: counters;
    * ``jobs_failed_total{code}``: counter per error code (``DOWNLOAD_FAILED``...);
    * ``job_duration_seconds{outcome}``: histogram, ``outcome`` = completed, failed, requeued;
    * ``job_progress``: the current job's progress, 0..1 (0 when idle);
    * ``webhooks_pending``: terminal webhooks waiting in the outbox;
    * ``broker_last_seen_age_seconds``: seconds since the last heartbeat or I/O with the
      broker, computed at scrape time (``+Inf`` before the first one);
    * ``ready``: 1 when the readiness check passes, else 0 (computed at scrape time).

    Args:
        clock: The monotonic clock used for the broker age (injectable for tests).
        ready: The readiness check behind the ``ready`` gauge and ``/readyz``; "not ready"
            until one is given (here, to :meth:`set_ready_check` or to :func:`serve_ops`).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        ready: ReadyCheck | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._broker_seen_at: float | None = None
        self._ready: ReadyCheck | None = ready
        p, r = METRIC_PREFIX, self.registry
        self.jobs_started = Counter(f"{p}_jobs_started", "Jobs taken from the queue", registry=r)
        self.jobs_completed = Counter(
            f"{p}_jobs_completed", "Jobs trained, uploaded and acknowledged", registry=r
        )
        self.jobs_failed = Counter(
            f"{p}_jobs_failed", "Jobs failed (rejected), by error code", ["code"], registry=r
        )
        self.jobs_requeued = Counter(
            f"{p}_jobs_requeued", "Jobs interrupted and put back on the queue", registry=r
        )
        self.job_duration = Histogram(
            f"{p}_job_duration_seconds",
            "Wall-clock seconds from taking a job to its outcome",
            ["outcome"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.job_progress = Gauge(
            f"{p}_job_progress", "Progress of the current job, 0..1 (0 when idle)", registry=r
        )
        self.webhooks_pending = Gauge(
            f"{p}_webhooks_pending", "Terminal webhooks waiting in the outbox", registry=r
        )
        self.broker_age = Gauge(
            f"{p}_broker_last_seen_age_seconds",
            "Seconds since the last heartbeat or I/O with the broker (+Inf: never)",
            registry=r,
        )
        self.broker_age.set_function(self._broker_age_value)
        self.ready_gauge = Gauge(f"{p}_ready", "1 when the worker is ready, else 0", registry=r)
        self.ready_gauge.set_function(lambda: 1.0 if self.readiness()[0] else 0.0)

    # ------------------------------------------------------------------ job events

    def job_started(self) -> None:
        """Count a job taken from the queue and reset the progress gauge."""
        self.jobs_started.inc()
        self.job_progress.set(0.0)

    def job_completed(self, duration_s: float) -> None:
        """Count a completed job.

        Args:
            duration_s: Seconds from taking the job to its acknowledgement.
        """
        self.jobs_completed.inc()
        self._finished("completed", duration_s)

    def job_failed(self, code: str, duration_s: float) -> None:
        """Count a failed (rejected) job.

        Args:
            code: Its error code (``INVALID_MESSAGE``, ``DOWNLOAD_FAILED``...); keep the set of
                codes small, each one is a time series. Empty means ``UNKNOWN``.
            duration_s: Seconds from taking the job to its rejection.
        """
        self.jobs_failed.labels(code=code or "UNKNOWN").inc()
        self._finished("failed", duration_s)

    def job_requeued(self, duration_s: float) -> None:
        """Count a job put back on the queue (interrupted by a shutdown).

        Args:
            duration_s: Seconds from taking the job to its requeue.
        """
        self.jobs_requeued.inc()
        self._finished("requeued", duration_s)

    def set_progress(self, fraction: float) -> None:
        """Set the current job's progress.

        Args:
            fraction: Done fraction; clamped to 0..1 (NaN counts as 0).
        """
        value = float(fraction)
        self.job_progress.set(0.0 if math.isnan(value) else min(1.0, max(0.0, value)))

    def set_outbox_pending(self, n: int) -> None:
        """Set the number of terminal webhooks waiting in the outbox.

        Args:
            n: Their number.
        """
        self.webhooks_pending.set(max(0, n))

    # ------------------------------------------------------------------ broker and readiness

    def broker_seen(self) -> None:
        """Record a heartbeat or I/O with the broker, now."""
        self._broker_seen_at = self._clock()

    def broker_age_s(self) -> float | None:
        """Seconds since :meth:`broker_seen` was last called, ``None`` if it never was."""
        seen = self._broker_seen_at
        return None if seen is None else max(0.0, self._clock() - seen)

    def broker_seen_within(self, max_age_s: float) -> bool:
        """Tell whether the broker was seen in the last ``max_age_s`` seconds.

        Args:
            max_age_s: The longest acceptable silence.

        Returns:
            ``False`` also when it was never seen.
        """
        age = self.broker_age_s()
        return age is not None and age <= max_age_s

    def set_ready_check(self, ready: ReadyCheck) -> None:
        """Set the readiness check used by the ``ready`` gauge and ``/readyz``.

        Args:
            ready: Returns ``True``/``False`` or ``(ready, reason)``; called on every scrape
                and probe, so keep it cheap. An exception counts as "not ready".
        """
        self._ready = ready

    def readiness(self) -> tuple[bool, str]:
        """Run the readiness check.

        Returns:
            ``(ready, reason)``; the reason is ``"ready"`` or says what is missing.
        """
        check = self._ready
        if check is None:
            return False, "no readiness check configured"
        try:
            result = check()
        except Exception as exc:
            log.warning("readiness check raised %s", type(exc).__name__, exc_info=True)
            return False, f"readiness check raised {type(exc).__name__}"
        if isinstance(result, tuple):
            ready, reason = bool(result[0]), str(result[1])
        else:
            ready, reason = bool(result), ""
        return ready, ("ready" if ready else reason or "not ready")

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """Render the metrics as ``/metrics`` serves them.

        Args:
            accept: The request's ``Accept`` header: the format is negotiated by
                :func:`prometheus_client.exposition.choose_encoder` (OpenMetrics when asked for,
                else the Prometheus text format 0.0.4).

        Returns:
            ``(body, content_type)``.
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # ------------------------------------------------------------------ internals

    def _finished(self, outcome: str, duration_s: float) -> None:
        self.job_duration.labels(outcome=outcome).observe(max(0.0, float(duration_s)))
        self.job_progress.set(0.0)

    def _broker_age_value(self) -> float:
        age = self.broker_age_s()
        return math.inf if age is None else age


class _OpsHandler(BaseHTTPRequestHandler):
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` for the server's :class:`WorkerMetrics`."""

    server: _OpsHTTPServer
    server_version = "lightning-lora-worker"
    sys_version = ""
    timeout = 10  # seconds a client may take to send its request

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        metrics = self.server.metrics
        if path == "/metrics":
            self._reply(HTTPStatus.OK, *metrics.render(self.headers.get("Accept", "")))
        elif path == "/healthz":
            self._reply(HTTPStatus.OK, b"ok\n")
        elif path == "/readyz":
            ready, reason = metrics.readiness()
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            self._reply(status, f"{reason}\n".encode())
        else:
            self._reply(HTTPStatus.NOT_FOUND, b"not found\n")

    def _reply(
        self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    @override
    def log_message(self, format: str, *args: object) -> None:
        log.debug("ops %s - %s", self.address_string(), format % args)


class _OpsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    metrics: WorkerMetrics


class _OpsHTTPServerV6(_OpsHTTPServer):
    address_family = socket.AF_INET6


class OpsServer:
    """The worker's operations HTTP server (metrics, liveness, readiness) on a daemon thread.

    Args:
        metrics: The metrics to serve; its readiness check answers ``/readyz``.
        host: Address to bind; ``127.0.0.1`` by default (``0.0.0.0`` to be scraped from other
            hosts, ``::`` for IPv6).
        port: TCP port; 0 picks a free one (see :attr:`port`).

    Use :meth:`start` and :meth:`stop`, or a ``with`` block.
    """

    def __init__(self, metrics: WorkerMetrics, host: str = "127.0.0.1", port: int = 0) -> None:
        server_class = _OpsHTTPServerV6 if ":" in host else _OpsHTTPServer
        self._server = server_class((host, port), _OpsHandler)
        self._server.metrics = metrics
        self.metrics = metrics
        self.host = host
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (the free one chosen when 0 was asked)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:9100``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> OpsServer:
        """Start serving on a daemon thread (no-op when already started).

        Returns:
            The server itself.
        """
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.5},
                name="ops-http",
                daemon=True,
            )
            self._thread.start()
            log.info("ops endpoint on %s (/metrics, /healthz, /readyz)", self.url)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and close the socket (idempotent).

        Args:
            timeout_s: How long to wait for the serving thread to end.
        """
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout_s)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> OpsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_ops(
    metrics: WorkerMetrics,
    host: str = "127.0.0.1",
    port: int = 0,
    ready: ReadyCheck | None = None,
) -> OpsServer:
    """Start the operations HTTP server.

    Args:
        metrics: The metrics to serve.
        host: Address to bind (``127.0.0.1`` by default).
        port: TCP port; 0 picks a free one (read it from the result's ``port``).
        ready: Readiness check for ``/readyz`` and the ``ready`` gauge, e.g. "consumer
            connected and broker seen in the last 60 s"; when ``None``, the one already set on
            ``metrics`` (if none, the worker is never ready).

    Returns:
        The started server; call its ``stop()`` to shut it down.

    Raises:
        OSError: The address cannot be bound (port in use...).
    """
    if ready is not None:
        metrics.set_ready_check(ready)
    return OpsServer(metrics, host, port).start()
