"""``lightning-lora-worker``: consume training jobs until SIGTERM/SIGINT.

Arguments are Hydra overrides of ``configs/worker.yaml``: training keys as for
``lightning-lora-train`` (``model=sd15 trainer.precision=bf16-mixed``) and worker keys under
``worker.`` (``worker.limits.max_images=50``). Everything is checked before the first message
is consumed; a bad setting exits with status 2 and a message naming it.

* ``--check``: connect to the broker, head the bucket and test its conditional writes, reach each
  allow-listed backend; print what works and what doesn't; exit 0 when all do, 1 otherwise, 2
  when the store ignores conditional writes (and ``worker.require_conditional_writes``).

At start the worker tests the bucket's conditional writes too (:mod:`~.clients.store_checks`):
exactly-once rests on them, so a store that ignores them stops it with status 2, naming the store
and what it ignored, unless ``worker.require_conditional_writes=false`` (then a warning at every
start).
* ``--print-config``: print the composed config and exit (nothing is contacted).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from lightning_lora.clients.redaction import register_secret
from lightning_lora.config import compose_config

if TYPE_CHECKING:  # the CLI imports the worker's parts only once the arguments are parsed
    from lightning_lora.clients.storage import S3Storage
    from lightning_lora.worker.settings import BrokerSettings, WorkerSettings

__all__ = ["check_store", "compose_worker_config", "main", "run_checks"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_SETTINGS = 2


def compose_worker_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/worker.yaml`` (the training config plus ``worker:``) with overrides."""
    return compose_config(overrides, config_name="worker")


def _endpoint(entry: str) -> tuple[str, int]:
    """Host and port to reach for an allowlist entry (host, host:port or base URL)."""
    parts = urlsplit(entry if "://" in entry else f"//{entry}")
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname or entry, parts.port or default


def run_checks(
    settings: WorkerSettings, broker: BrokerSettings, storage: S3Storage | None = None
) -> int:
    """Try the broker, the bucket and each allow-listed backend; print one line for each.

    Args:
        settings: The :class:`~lightning_lora.worker.settings.WorkerSettings`.
        broker: The :class:`~lightning_lora.worker.broker.BrokerSettings`.
        storage: The bucket (built from the settings when ``None``).

    Returns:
        :data:`EXIT_OK` when everything answered, else :data:`EXIT_CHECK_FAILED`.
    """
    from pika import BlockingConnection

    from lightning_lora.clients.storage import S3Storage
    from lightning_lora.clients.store_checks import conditional_write_problems

    results: list[tuple[bool, str, str]] = []
    try:
        params = broker.connection_parameters(connection_name="lightning_lora-check")
        params.socket_timeout = 5
        connection = BlockingConnection(params)
        connection.close()
        results.append((True, "broker", broker.describe()))
    except Exception as exc:
        detail = (
            f"{type(exc).__name__}: {exc!r}" if not str(exc) else f"{type(exc).__name__}: {exc}"
        )
        results.append((False, "broker", f"{broker.describe()}: {detail}"))
    store_ignores: list[str] = []
    try:
        bucket = storage or S3Storage(
            settings.s3_bucket, endpoint_url=settings.s3_endpoint_url, retry_budget_s=0
        )
        bucket.head_bucket()
        results.append((True, "s3", f"s3://{bucket.bucket}"))
        store_ignores = conditional_write_problems(bucket)
        results.append(
            (not store_ignores, "s3", _conditional_writes_line(bucket, store_ignores, settings))
        )
    except Exception as exc:
        results.append((False, "s3", str(exc)))
    for entry in settings.webhook_allowlist:
        host, port = _endpoint(entry)
        try:
            with socket.create_connection((host, port), timeout=5):
                results.append((True, "backend", f"{entry} ({host}:{port})"))
        except OSError as exc:
            results.append((False, "backend", f"{entry} ({host}:{port}): {exc}"))
    for ok, what, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what:8} {detail}")
    if store_ignores and settings.require_conditional_writes:
        return EXIT_BAD_SETTINGS
    return EXIT_OK if all(ok for ok, _, _ in results) else EXIT_CHECK_FAILED


def _store_name(storage: S3Storage) -> str:
    return f"s3://{storage.bucket} at {storage.endpoint_url or 'AWS S3'}"


def _conditional_writes_line(
    storage: S3Storage, ignored: Sequence[str], settings: WorkerSettings
) -> str:
    if not ignored:
        return f"{_store_name(storage)} honours If-None-Match and If-Match"
    allowed = "" if settings.require_conditional_writes else " (allowed: exactly-once is lost)"
    return f"{_store_name(storage)}: " + "; ".join(ignored) + allowed


def check_store(storage: S3Storage, settings: WorkerSettings) -> int | None:
    """Test the bucket's conditional writes at start; an exit status if the worker must stop.

    Returns:
        ``None`` to go on; :data:`EXIT_BAD_SETTINGS` when the store ignores a condition and
        ``worker.require_conditional_writes`` is on; :data:`EXIT_CHECK_FAILED` when the store
        could not be asked.
    """
    from lightning_lora.clients.store_checks import conditional_write_problems

    try:
        ignored = conditional_write_problems(storage)
    except Exception as exc:
        print(
            f"lightning-lora-worker: could not test {_store_name(storage)}: {exc}",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED
    if not ignored:
        log.info("%s honours conditional writes", _store_name(storage))
        return None
    line = _conditional_writes_line(storage, ignored, settings)
    if settings.require_conditional_writes:
        print(
            f"lightning-lora-worker: {line}. Exactly-once rests on conditional writes: use a "
            "store that honours them, or set worker.require_conditional_writes=false to run "
            "without the guarantee.",
            file=sys.stderr,
        )
        return EXIT_BAD_SETTINGS
    log.warning(
        "%s; running anyway (worker.require_conditional_writes=false): two workers may train "
        "and report one job",
        line,
    )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-lora-worker``: consume training jobs until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="lightning-lora-worker",
        description="Consume SD1.5 LoRA training jobs from RabbitMQ (see README, Queue runner).",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="overrides of configs/worker.yaml: training keys (model=sd15) and worker.* keys",
    )
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    parser.add_argument("--check", action="store_true", help="check broker, S3 and backends")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    args = parser.parse_args(argv)

    from lightning_lora.worker.app import split_config
    from lightning_lora.worker.logs import configure_logging
    from lightning_lora.worker.settings import SettingsError, load_settings

    try:
        cfg = compose_worker_config(args.overrides)
    except Exception as exc:  # Hydra's override and composition errors
        print(f"lightning-lora-worker: invalid arguments: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return EXIT_OK
    train_cfg, section = split_config(cfg)
    try:
        settings = load_settings(section)
        configure_logging(args.log_level, settings.log_format)
    except (SettingsError, ValueError) as exc:
        print(f"lightning-lora-worker: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    for secret in settings.secrets():
        register_secret(secret)
    logging.getLogger("pika").setLevel(logging.WARNING)
    if args.check:
        return run_checks(settings, settings.broker)
    return _serve(train_cfg, settings)


def _serve(train_cfg: DictConfig, settings: WorkerSettings) -> int:
    """Consume until stopped: the worker, its outbox and (with ``METRICS_PORT``) its endpoint."""
    from lightning_lora.worker.app import TrainingWorker
    from lightning_lora.worker.broker import publish_dead_letter
    from lightning_lora.worker.consumer import Consumer
    from lightning_lora.worker.jobdirs import remove_stale_job_dirs
    from lightning_lora.worker.ops import WorkerMetrics, serve_ops

    broker = settings.broker
    removed = remove_stale_job_dirs(Path(settings.work_dir) if settings.work_dir else None)
    if removed:
        log.info("removed %d job folder(s) left by dead workers", len(removed))
    metrics = WorkerMetrics()
    worker = TrainingWorker(
        train_cfg,
        settings,
        delivery_limit=broker.delivery_limit,
        metrics=metrics,
        dead_letter=lambda body, headers: publish_dead_letter(
            broker, body, headers, str(headers.get("x-lightning-lora-reason", "outbox"))
        ),
    )
    consumer = Consumer(
        broker,
        worker.handle,
        on_poison=worker.on_poison,
        grace_period=settings.grace_period_s,
        on_io=metrics.broker_seen,
        on_control=worker.on_control,
    )
    server = None
    if settings.metrics_port is not None:
        server = serve_ops(
            metrics,
            settings.metrics_host,
            settings.metrics_port,
            ready=lambda: consumer.consuming.is_set() and metrics.broker_seen_within(60.0),
        )
        log.info("health and metrics on http://%s:%d/", settings.metrics_host, server.port)
    stop = check_store(worker.storage, settings)
    if stop is not None:
        return stop
    worker.outbox.on_scan = metrics.set_outbox_pending
    worker.outbox.start()
    log.info("worker consuming %s (%s)", broker.queue, broker.describe())
    log.info("settings: %s", json.dumps(settings.public(), default=str))
    try:
        consumer.run()
    finally:
        worker.outbox.stop()
        if server is not None:
            server.stop()
    log.info("worker stopped after %d job(s)", worker.jobs_done)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
