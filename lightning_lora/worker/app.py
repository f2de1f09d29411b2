"""The queue runner: a RabbitMQ job in, a trained LoRA in S3 and webhooks to the backend out.

``lightning-lora-worker`` composes ``configs/worker.yaml``, loads nothing until the first job,
then for every message:

1. validates it (:mod:`lightning_lora.worker.messages`); an invalid message is dead-lettered
   with a log line naming the field, and a failure webhook (``INVALID_MESSAGE``) when its
   ``style_id`` and ``webhook_url`` are usable and allow-listed;
2. refuses a ``webhook_url`` outside the allowlist (no request is sent to it; dead-lettered);
3. downloads the images into a per-job temporary folder (collision-free names, count and byte
   limits), removed after the job whatever happens;
4. turns the job into Hydra overrides of the same training config a researcher uses and runs
   :func:`lightning_lora.reporting.run_reported_training` (progress webhooks, S3 checkpoints,
   resume from S3, final upload, exactly one completion or failure webhook);
5. acks when the outcome is settled; dead-letters a failed job; requeues a job interrupted by a
   shutdown after it checkpointed to S3.

The base model is loaded once per process (``load_components`` keeps it) and each job gets a
freshly initialised LoRA (``inject_lora``), so nothing carries over from one job to the next.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from lightning_lora.errors import (
    InvalidMessageError,
    JobCrashedError,
    JobInterrupted,
    error_code_of,
)
from lightning_lora.redaction import install_redaction, redact
from lightning_lora.worker.consumer import BrokerSettings, Consumer, Delivery, Outcome
from lightning_lora.worker.messages import (
    TrainingJob,
    job_to_overrides,
    parse_job,
    peek_identity,
    webhook_allowed,
)

log = logging.getLogger(__name__)


@dataclass
class WorkerSettings:
    """What the worker needs besides the broker (from ``configs/worker.yaml`` + environment).

    Attributes:
        train_overrides: Overrides of ``configs/train.yaml`` applied to every job.
        webhook_allowlist: Hosts, ``host:port`` or base URLs a job's webhook may target.
        allowed_buckets: Buckets images may come from (empty: any).
        max_images: Most image URLs per job.
        max_image_bytes: Largest image file.
        max_total_bytes: Largest total download per job.
        max_message_bytes: Largest message body.
        grace_period_s: Time a running job gets to checkpoint on shutdown.
        work_dir: Parent of the per-job folders (``None``: system temp).
        resume_from_s3: Resume redelivered jobs from their newest S3 checkpoint.
    """

    train_overrides: list[str] = field(default_factory=lambda: ["callbacks=production"])
    webhook_allowlist: list[str] = field(default_factory=list)
    allowed_buckets: list[str] = field(default_factory=list)
    max_images: int = 100
    max_image_bytes: int = 20_000_000
    max_total_bytes: int = 500_000_000
    max_message_bytes: int = 1_000_000
    grace_period_s: float = 120.0
    work_dir: str | None = None
    resume_from_s3: bool = True

    @classmethod
    def from_config(cls, cfg: DictConfig, env: dict[str, str] | None = None) -> WorkerSettings:
        """Settings from the composed ``worker.yaml``.

        ``WEBHOOK_ALLOWLIST`` and ``S3_ALLOWED_BUCKETS`` (comma-separated) extend the lists.
        """
        env = dict(os.environ if env is None else env)
        plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        limits = plain.pop("limits", {}) or {}

        def merged(key: str, env_name: str) -> list[str]:
            extra = [v.strip() for v in env.get(env_name, "").split(",") if v.strip()]
            return [*(plain.get(key) or []), *extra]

        return cls(
            train_overrides=list(plain.get("train_overrides") or []),
            webhook_allowlist=merged("webhook_allowlist", "WEBHOOK_ALLOWLIST"),
            allowed_buckets=merged("allowed_buckets", "S3_ALLOWED_BUCKETS"),
            grace_period_s=float(plain.get("grace_period_s", 120.0)),
            work_dir=plain.get("work_dir"),
            resume_from_s3=bool(plain.get("resume_from_s3", True)),
            **{k: int(v) for k, v in limits.items()},
        )


#: Written under the run's checkpoint prefix once the job is done and its completion was sent
#: (or given up after the retry budget).
COMPLETED_MARKER = "completed.json"


def job_run_id(delivery: Delivery) -> str:
    """A job's identity across redeliveries: its AMQP message id, else a hash of its body.

    Checkpoints and the completion marker are kept per run id, so a redelivered job resumes
    its own checkpoints and a new job for the same style starts fresh.
    """
    message_id = delivery.message_id or ""
    if re.fullmatch(r"[A-Za-z0-9._-]{1,80}", message_id) and message_id not in {".", ".."}:
        return message_id
    return "sha-" + hashlib.sha256(delivery.body).hexdigest()[:32]


class InterruptOnStop(L.Callback):
    """Ends training at the next epoch end once a stop is requested, after an S3 checkpoint.

    Raises :class:`JobInterrupted` (not a failure: no failure webhook) so that the worker
    requeues the message; the redelivered job resumes from the checkpoint.
    """

    def __init__(self, stop: threading.Event) -> None:
        """Watch ``stop`` (the consumer's shutdown event)."""
        self.stop = stop

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.stop.is_set():
            return
        from lightning_lora.callbacks.s3_checkpoint import S3CheckpointCallback

        for callback in trainer.callbacks:
            if isinstance(callback, S3CheckpointCallback):
                callback.checkpoint_now(trainer)
                callback.wait()
        raise JobInterrupted(
            f"worker shutting down: stopped after epoch {trainer.current_epoch + 1}, checkpointed"
        )


@dataclass
class JobTimings:
    """Seconds spent in each phase of a job (logged as one line per job)."""

    queue_wait_s: float | None = None
    download_s: float = 0.0
    training_s: float = 0.0
    upload_s: float = 0.0
    upload_and_report_s: float = 0.0
    total_s: float = 0.0

    def line(self) -> str:
        """``key=value`` pairs for the log."""
        return " ".join(
            f"{k}={v:.2f}" for k, v in self.__dict__.items() if isinstance(v, (int, float))
        )


class TrainingWorker:
    """Turns deliveries into reported trainings. One instance per worker process."""

    def __init__(self, settings: WorkerSettings, storage: Any | None = None) -> None:
        """Configure.

        Args:
            settings: Worker settings.
            storage: An :class:`~lightning_lora.clients.storage.S3Storage` (built from the
                environment on first use when ``None``).
        """
        self.settings = settings
        self._storage = storage
        self.jobs_done = 0

    @property
    def storage(self) -> Any:
        """The bucket (``S3_BUCKET``, ``S3_ENDPOINT_URL``, AWS credentials from the env)."""
        if self._storage is None:
            from lightning_lora.clients.storage import S3Storage

            self._storage = S3Storage()
        return self._storage

    # ------------------------------------------------------------------ entry points
    def handle(self, delivery: Delivery) -> Outcome:
        """Run one job to a settled outcome (the consumer's handler)."""
        started = time.monotonic()
        timings = JobTimings()
        if delivery.published_at is not None:
            timings.queue_wait_s = max(0.0, time.time() - delivery.published_at.timestamp())
        try:
            job = parse_job(
                delivery.body,
                max_images=self.settings.max_images,
                max_body_bytes=self.settings.max_message_bytes,
            )
        except InvalidMessageError as exc:
            log.error("message %s dead-lettered: %s", delivery.message_id, exc)
            self._report_unparsed(delivery.body, exc)
            return Outcome.REJECT
        if not webhook_allowed(job.webhook_url, self.settings.webhook_allowlist):
            log.error(
                "job %s (style %s) dead-lettered: field 'webhook_url': host not in the webhook "
                "allowlist (WEBHOOK_ALLOWLIST); no request was sent to it",
                job.job_id,
                job.style_id,
            )
            return Outcome.REJECT
        log.info("job %s: style %s, %d image(s)", job.job_id, job.style_id, len(job.image_urls))
        try:
            return self._run(job, delivery, timings)
        finally:
            timings.total_s = time.monotonic() - started
            log.info("job %s timings: %s", job.job_id, timings.line())

    def on_poison(self, delivery: Delivery) -> None:
        """A message that reached the redelivery limit: report it failed (it is dead-lettered)."""
        try:
            job = parse_job(
                delivery.body,
                max_images=self.settings.max_images,
                max_body_bytes=self.settings.max_message_bytes,
            )
        except InvalidMessageError:
            return
        if not webhook_allowed(job.webhook_url, self.settings.webhook_allowlist):
            return
        exc = JobCrashedError(
            f"job {job.job_id} was delivered {delivery.delivery_count} times without finishing "
            "(the worker crashed or was killed each time); dead-lettered"
        )
        self._send_failure(job.webhook_url, job.style_id, exc)

    # ------------------------------------------------------------------ the job
    def _run(self, job: TrainingJob, delivery: Delivery, timings: JobTimings) -> Outcome:
        from lightning_lora.clients.storage import checkpoint_prefix, model_key
        from lightning_lora.reporting import build_sender, run_reported_training
        from lightning_lora.train import compose_config

        run_id = job_run_id(delivery)
        marker = checkpoint_prefix(job.style_id, run_id) + COMPLETED_MARKER
        if self._exists(marker):
            log.warning(
                "job %s (run %s) already completed: acknowledging without training",
                job.job_id,
                run_id,
            )
            return Outcome.ACK
        job_dir = Path(
            tempfile.mkdtemp(prefix=f"ll-job-{job.style_id}-", dir=self.settings.work_dir)
        )
        sender = None
        try:
            cfg = compose_config(
                [
                    *self.settings.train_overrides,
                    *job_to_overrides(job),
                    f"data.image_dir={job_dir / 'images'}",
                ],
                output_dir=job_dir / "run",
            )
            sender = build_sender(job.webhook_url, cfg)
            t0 = time.monotonic()
            try:
                self._download(job, job_dir / "images")
            except Exception as exc:
                log.error("job %s: download failed: %s", job.job_id, redact(str(exc)))
                sender.post_failed(job.style_id, redact(str(exc)), error_code_of(exc))
                return Outcome.REJECT
            finally:
                timings.download_s = time.monotonic() - t0
            t0 = time.monotonic()
            try:
                result = run_reported_training(
                    cfg,
                    job.style_id,
                    sender,
                    self.storage,
                    callbacks=[InterruptOnStop(delivery.stop_requested)],
                    resume=self.settings.resume_from_s3,
                    work_dir=job_dir / "resume",
                    run_id=run_id,
                )
            except JobInterrupted as exc:
                log.warning("job %s requeued: %s", job.job_id, exc)
                return Outcome.REQUEUE
            except Exception as exc:
                log.error(
                    "job %s failed (%s): %s", job.job_id, error_code_of(exc), redact(str(exc))
                )
                return Outcome.REJECT
            finally:
                elapsed = time.monotonic() - t0
            timings.training_s = float(result.metrics.get("train_seconds", elapsed))
            timings.upload_s = float(result.metrics.get("upload_seconds", 0.0))
            timings.upload_and_report_s = max(0.0, elapsed - timings.training_s)
            stats = sender.stats
            if stats.reliable_sent < stats.reliable_posted:
                # The backend did not take the completion within its retry budget. The LoRA is in
                # S3 and the job is done: acked (requeueing would retrain and could end in a
                # REDELIVERY_LIMIT failure for a model that exists). See docs/RELIABILITY.md.
                log.error(
                    "job %s: completion webhook not delivered (the LoRA is at %s)",
                    job.job_id,
                    self.storage.s3_url(model_key(job.style_id)),
                )
            self._mark_completed(job, run_id, marker, job_dir)
            self.jobs_done += 1
            return Outcome.ACK
        finally:
            if sender is not None:
                sender.close(timeout_s=30.0)
            shutil.rmtree(job_dir, ignore_errors=True)

    def _exists(self, key: str) -> bool:
        try:
            return bool(self.storage.exists(key))
        except Exception as exc:  # an unreachable store fails the download step with its code
            log.warning("could not check %s: %s", key, redact(str(exc)))
            return False

    def _mark_completed(self, job: TrainingJob, run_id: str, marker: str, job_dir: Path) -> None:
        """Record the completion and drop the run's checkpoints.

        A redelivery of the same message then acks without training again. Best effort: a
        failure is logged, the job stays completed.
        """
        from lightning_lora.callbacks.s3_checkpoint import list_checkpoints

        try:
            path = job_dir / COMPLETED_MARKER
            path.write_text(
                json.dumps(
                    {"style_id": job.style_id, "run_id": run_id, "completed_at": time.time()}
                ),
                encoding="utf-8",
            )
            self.storage.upload_file(path, marker)
            self.storage.delete_keys(list_checkpoints(self.storage, job.style_id, run_id))
        except Exception as exc:
            log.warning("job %s: completion marker not written: %s", job.job_id, redact(str(exc)))

    def _download(self, job: TrainingJob, dest: Path) -> None:
        """Fetch the images and write the job's captions beside them."""
        paths = self.storage.download_images(
            job.image_urls,
            dest,
            max_count=self.settings.max_images,
            max_bytes_per_file=self.settings.max_image_bytes,
            max_total_bytes=self.settings.max_total_bytes,
            allowed_buckets=self.settings.allowed_buckets or None,
        )
        captions = job.captions
        if captions is None:
            return
        if isinstance(captions, dict):
            by_name = {Path(url.rsplit("/", 1)[-1]).name: url for url in job.image_urls}
            lookup = {by_name.get(name, name): text for name, text in captions.items()}
            per_image = [lookup.get(url) for url in job.image_urls]
        else:
            per_image = list(captions)
        for path, caption in zip(paths, per_image, strict=False):
            if caption:
                path.with_suffix(".txt").write_text(caption, encoding="utf-8")

    # ------------------------------------------------------------------ failures without a job
    def _report_unparsed(self, body: bytes, exc: InvalidMessageError) -> None:
        style_id, webhook_url = peek_identity(body)
        if style_id is None or webhook_url is None:
            return
        if not webhook_allowed(webhook_url, self.settings.webhook_allowlist):
            log.warning("not reporting the invalid message: its webhook_url is not allow-listed")
            return
        self._send_failure(webhook_url, style_id, exc)

    @staticmethod
    def _send_failure(webhook_url: str, style_id: int, exc: BaseException) -> None:
        from lightning_lora.clients.webhook_client import WebhookClient

        WebhookClient(webhook_url).send_failed(style_id, redact(str(exc)), error_code_of(exc))


def compose_worker_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/worker.yaml`` with overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_lora.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="worker", overrides=list(overrides))


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-lora-worker``: consume training jobs until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="lightning-lora-worker",
        description="Consume SD1.5 LoRA training jobs from RabbitMQ (see README, Queue runner).",
    )
    parser.add_argument("overrides", nargs="*", help="overrides of configs/worker.yaml")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
        stream=sys.stdout,
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    install_redaction()
    settings = WorkerSettings.from_config(compose_worker_config(args.overrides))
    if not settings.webhook_allowlist:
        log.warning("the webhook allowlist is empty: every job will be refused (WEBHOOK_ALLOWLIST)")
    broker = BrokerSettings.from_env()
    worker = TrainingWorker(settings)
    consumer = Consumer(
        broker, worker.handle, on_poison=worker.on_poison, grace_period=settings.grace_period_s
    )
    log.info("worker consuming %s (%s)", broker.queue, broker.describe())
    log.info("settings: %s", json.dumps({**settings.__dict__}, default=str))
    consumer.run()
    log.info("worker stopped after %d job(s)", worker.jobs_done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
