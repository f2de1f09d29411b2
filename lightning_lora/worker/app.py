"""The queue runner: a RabbitMQ job in, a trained LoRA in S3 and one terminal webhook out.

``lightning-lora-worker`` composes ``configs/worker.yaml`` (the training config plus a
``worker:`` section), checks every setting, loads nothing until the first job, then for every
message:

1. validates it (:mod:`lightning_lora.worker.messages`); an invalid message is dead-lettered
   with its reason, and reported (``INVALID_MESSAGE``) when its ``style_id`` and
   ``webhook_url`` are usable and allow-listed; a ``webhook_url`` outside the allowlist gets no
   request at all;
2. finds the job's run in S3 (:class:`~lightning_lora.worker.ledger.Ledger`): a redelivery of a
   reported run acks without training (re-sending the outcome if the backend has not
   acknowledged it), a new publication of the same body is a new run;
3. takes the run's lease, so no other live worker trains it at the same time (waiting while
   one does); a run taken over after more than ``RABBITMQ_DELIVERY_LIMIT`` crashes is poison;
4. downloads the images into a job folder (content-typed names, count and byte limits), writes
   the job's captions as plain text, sets the job's numbers on a copy of the training config
   (nothing from a message is parsed or resolved) and runs
   :func:`lightning_lora.jobs.runner.run_reported_training`;
5. settles the message by the one rule (:func:`~lightning_lora.errors.disposition_of`): ack when
   reported, dead-letter a failed job (after its one failure report), requeue one interrupted by
   a shutdown or by S3 being down for the whole retry budget (the finished LoRA is kept).

A cancel of the job's style (:mod:`lightning_lora.worker.cancels`) ends a queued job before it
trains and a running one at its next step: one ``CANCELLED`` failure webhook, its checkpoints
deleted, the message acked.

The terminal webhook goes through :class:`~lightning_lora.worker.outbox.DurableSink`: created
once in S3, re-sent by every worker's outbox until the backend answers 2xx.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_lora.callbacks.s3_checkpoint import list_checkpoints
from lightning_lora.clients.redaction import redact
from lightning_lora.clients.storage import S3Storage
from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_sender import WebhookSender
from lightning_lora.config import plain_dict
from lightning_lora.errors import (
    InvalidMessageError,
    JobCancelledError,
    JobCrashedError,
    StorageUnavailableError,
    disposition_of,
)
from lightning_lora.jobs.layout import checkpoint_prefix, job_key_for, outbox_key
from lightning_lora.jobs.report import JobReport, webhook_client
from lightning_lora.jobs.runner import run_reported_training
from lightning_lora.training.run import release_training_memory
from lightning_lora.worker.cancels import CancelWatch, barrier, barrier_of, parse_cancel
from lightning_lora.worker.deliveries import ControlReply, Delivery, Outcome, Settlement
from lightning_lora.worker.job_callbacks import InterruptOnStop, ProgressGauge, StopOnCancel
from lightning_lora.worker.jobdirs import job_dir_owned_here, make_job_dir
from lightning_lora.worker.ledger import Lease, LeaseBusy, Ledger
from lightning_lora.worker.messages import (
    TrainingJob,
    job_settings,
    parse_job,
    peek_identity,
    webhook_allowed,
)
from lightning_lora.worker.ops import WorkerMetrics
from lightning_lora.worker.outbox import DeadLetter, DurableSink, Outbox
from lightning_lora.worker.records import OutcomeRecord, RunRef
from lightning_lora.worker.settings import WorkerSettings

__all__ = ["JobTimings", "TrainingWorker", "split_config"]

log = logging.getLogger(__name__)


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


def split_config(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """The training config and the plain ``worker:`` section of a composed worker config."""
    train_cfg = copy.deepcopy(cfg)
    with open_dict(train_cfg):
        section = train_cfg.pop("worker", None)
    return train_cfg, plain_dict(section, resolve=True) if section is not None else {}


class TrainingWorker:
    """Turns deliveries into reported trainings. One instance per worker process.

    Args:
        train_cfg: The composed training config every job starts from (a copy per job).
        settings: Worker settings.
        storage: The bucket (built from the settings on first use when ``None``).
        delivery_limit: Attempts after which a job is poison (``RABBITMQ_DELIVERY_LIMIT``).
        callbacks: More training callbacks for every job (tests and plugins).
        metrics: A :class:`~lightning_lora.worker.ops.WorkerMetrics`, or ``None``.
        dead_letter: Publishes a body to the DLQ (the outbox, past its window).
    """

    def __init__(
        self,
        train_cfg: DictConfig,
        settings: WorkerSettings,
        storage: S3Storage | None = None,
        *,
        delivery_limit: int = 3,
        callbacks: Sequence[L.Callback] = (),
        metrics: WorkerMetrics | None = None,
        dead_letter: DeadLetter | None = None,
    ) -> None:
        self.train_cfg = train_cfg
        self.settings = settings
        self._storage = storage
        self.delivery_limit = delivery_limit
        self.callbacks = list(callbacks)
        self.metrics = metrics
        self.dead_letter = dead_letter
        self.jobs_done = 0
        self.last_timings: JobTimings | None = None
        self._ledger: Ledger | None = None
        self._outbox: Outbox | None = None

    # ------------------------------------------------------------------ shared parts
    @property
    def storage(self) -> S3Storage:
        """The bucket (``S3_BUCKET``, ``S3_ENDPOINT_URL``, AWS credentials from the env)."""
        if self._storage is None:
            s = self.settings
            self._storage = S3Storage(
                s.s3_bucket, endpoint_url=s.s3_endpoint_url, retry_budget_s=s.s3_retry_budget_s
            )
        return self._storage

    @property
    def ledger(self) -> Ledger:
        """The fleet's job state in the bucket."""
        if self._ledger is None:
            s = self.settings
            self._ledger = Ledger(
                self.storage, lease_ttl_s=s.lease_ttl_s, cancel_margin_s=s.cancel_margin_s
            )
        return self._ledger

    @property
    def outbox(self) -> Outbox:
        """The outbox of pending terminal webhooks (started by the CLI)."""
        if self._outbox is None:
            s = self.settings
            self._outbox = Outbox(
                self.ledger,
                self._client,
                s.webhook_allowlist,
                window_s=s.outbox_window_s,
                poll_s=s.outbox_poll_s,
                backoff_base_s=s.outbox_backoff_base_s,
                backoff_max_s=s.outbox_backoff_max_s,
                dead_letter=self.dead_letter,
            )
        return self._outbox

    def _client(self, webhook_url: str) -> WebhookClient:
        secret = self.settings.webhook_signing_secret
        return webhook_client(
            webhook_url,
            self.train_cfg,
            token=self.settings.internal_api_token.get_secret_value(),
            signing_secret=secret.get_secret_value() if secret is not None else None,
        )

    def _report(self, job_url: str, run: RunRef, body: bytes, rewrite: Any = None) -> JobReport:
        """The job's report: progress through a sender, the end through the durable sink."""
        sender = WebhookSender(self._client(job_url))
        sink = DurableSink(self.ledger, run, job_url, self._client(job_url), body, sender)
        return JobReport(sender, run.style_id, terminal=sink, rewrite=rewrite)

    def _fail_once(self, job_url: str, run: RunRef, body: bytes, exc: BaseException) -> None:
        """Report a job's failure that happened before it trained (poison, crashes)."""
        with self._report(job_url, run, body) as report:
            report.fail(exc)

    # ------------------------------------------------------------------ entry points
    def handle(self, delivery: Delivery) -> Settlement:
        """Run one job to a settled outcome (the consumer's handler)."""
        started = time.monotonic()
        timings = JobTimings()
        if delivery.published_at is not None:
            timings.queue_wait_s = max(0.0, time.time() - delivery.published_at.timestamp())
        try:
            closing = barrier_of(delivery.headers, delivery.body)
        except InvalidMessageError as exc:
            return Settlement(Outcome.REJECT, f"bad cancel barrier: {exc}")
        if closing is not None:
            return self._close_cancel(*closing)
        try:
            job = parse_job(
                delivery.body,
                max_images=self.settings.max_images,
                max_body_bytes=self.settings.max_message_bytes,
            )
        except InvalidMessageError as exc:
            log.error("message %s dead-lettered: %s", delivery.message_id, exc)
            self._report_unparsed(delivery, exc)
            return self._refused(Settlement(Outcome.REJECT, str(exc), exc.error_code))
        if not webhook_allowed(job.webhook_url, self.settings.webhook_allowlist):
            reason = (
                "field 'webhook_url': host not in the webhook allowlist (WEBHOOK_ALLOWLIST); no "
                "request was sent to it"
            )
            log.error("job %s (style %s) dead-lettered: %s", job.job_id, job.style_id, reason)
            return self._refused(Settlement(Outcome.REJECT, reason, "INVALID_MESSAGE"))
        log.info("job %s: style %s, %d image(s)", job.job_id, job.style_id, len(job.image_urls))
        if self.metrics is not None:
            self.metrics.job_started()
        settlement = Settlement(Outcome.REQUEUE)
        try:
            settlement = self._claim_and_run(job, delivery, timings)
            return settlement
        except Exception as exc:  # the ledger's calls: S3 down requeues, anything else raises
            if not disposition_of(exc).requeue:
                raise
            log.error("job %s requeued: %s", job.job_id, redact(str(exc)))
            settlement = Settlement(Outcome.REQUEUE)
            return settlement
        finally:
            timings.total_s = time.monotonic() - started
            self.last_timings = timings
            log.info("job %s timings: %s", job.job_id, timings.line())
            self._count(settlement, timings.total_s)

    # ------------------------------------------------------------------ cancels
    def on_control(self, delivery: Delivery) -> ControlReply:
        """A cancel from the backend: open the style's cancel and queue its barrier.

        Raises:
            StorageUnavailableError: The bucket is down (the consumer requeues the cancel).
        """
        try:
            style_id = parse_cancel(delivery.body)
        except InvalidMessageError as exc:
            return ControlReply(reject=str(exc))
        record = self.ledger.open_cancel(style_id)
        log.warning("style %s: cancel %s received", style_id, record.cancel_id)
        return ControlReply(publish=(barrier(style_id, record.cancel_id),))

    def _close_cancel(self, style_id: int, cancel_id: str) -> Settlement:
        """A cancel's barrier came out of the work queue: the jobs before it are all taken."""
        try:
            closed = self.ledger.close_cancel(style_id, cancel_id)
        except Exception as exc:
            if not disposition_of(exc).requeue:
                raise
            return Settlement(Outcome.REQUEUE)  # S3 down: the barrier comes back
        log.info("style %s: cancel %s %s", style_id, cancel_id, "closed" if closed else "replaced")
        return Settlement(Outcome.ACK)

    def _cancelled_before_training(
        self, job: TrainingJob, run: RunRef, body: bytes, lease: Lease
    ) -> Settlement:
        log.warning("job %s (run %s): cancelled before it trained", job.job_id, run.run_id)
        exc = JobCancelledError(f"job {job.job_id} of style {job.style_id} was cancelled")
        reported = False
        try:
            self._fail_once(job.webhook_url, run, body, exc)
            reported = True
        finally:
            lease.release(finished=reported)
        self._drop_checkpoints(run)
        return Settlement(Outcome.ACK, str(exc), exc.error_code)

    def _refused(self, settlement: Settlement) -> Settlement:
        """A message refused before it became a job: counted as failed, by its code."""
        if self.metrics is not None:
            self.metrics.job_failed(settlement.error_code or "INVALID_MESSAGE", 0.0)
        return settlement

    def _count(self, settlement: Settlement, duration_s: float) -> None:
        if self.metrics is None:
            return
        self.metrics.set_progress(0.0)
        if settlement.outcome is Outcome.ACK and settlement.error_code is not None:
            self.metrics.job_failed(settlement.error_code, duration_s)  # cancelled: acked
        elif settlement.outcome is Outcome.ACK:
            self.metrics.job_completed(duration_s)
        elif settlement.outcome is Outcome.REJECT:
            self.metrics.job_failed(settlement.error_code or "TRAINING_FAILED", duration_s)
        else:
            self.metrics.job_requeued(duration_s)

    def on_poison(self, delivery: Delivery) -> None:
        """A message the broker counted past the delivery limit: report it failed once."""
        try:
            job = parse_job(
                delivery.body, self.settings.max_images, self.settings.max_message_bytes
            )
        except InvalidMessageError:
            return
        if not webhook_allowed(job.webhook_url, self.settings.webhook_allowlist):
            return
        key = job_key_for(delivery.message_id, delivery.body)
        run = self.ledger.resolve_run(job.style_id, key, new_publication=False)
        self._fail_once(
            job.webhook_url, run, delivery.body, self._crashed(job, delivery.delivery_count)
        )

    @staticmethod
    def _crashed(job: TrainingJob, times: int) -> JobCrashedError:
        return JobCrashedError(
            f"job {job.job_id} was delivered {times} times without finishing "
            "(the worker crashed or was killed each time); dead-lettered"
        )

    # ------------------------------------------------------------------ runs and leases
    def _claim_and_run(
        self, job: TrainingJob, delivery: Delivery, timings: JobTimings
    ) -> Settlement:
        key = job_key_for(delivery.message_id, delivery.body)
        fresh = delivery.message_id is None and not delivery.redelivered
        run = self.ledger.resolve_run(
            job.style_id, key, new_publication=fresh and delivery.delivery_count == 0
        )
        waited = False
        while True:
            found = self.ledger.outcome(run)
            if found is not None:
                return self._already_reported(job, run, found)
            try:
                lease = self.ledger.acquire(run)
                break
            except LeaseBusy as busy:
                if not waited:
                    log.warning(
                        "job %s (run %s) is being trained by %s; waiting for it to finish or "
                        "its lease to expire",
                        job.job_id,
                        run.run_id,
                        busy.holder.worker_id,
                    )
                    waited = True
                if delivery.stop_requested.wait(max(0.2, min(5.0, self.settings.lease_ttl_s / 4))):
                    return Settlement(Outcome.REQUEUE)
        try:
            cancelled = self.ledger.cancel_stopping(run) is not None
        except BaseException:
            lease.release(finished=False)
            raise
        if cancelled:
            return self._cancelled_before_training(job, run, delivery.body, lease)
        crashes = max(lease.attempts - 1, delivery.delivery_count)
        if crashes >= self.delivery_limit:
            log.error(
                "job %s (run %s): %d attempts crashed; poison", job.job_id, run.run_id, crashes
            )
            self._fail_once(job.webhook_url, run, delivery.body, self._crashed(job, crashes))
            lease.release(finished=True)
            return Settlement(Outcome.REJECT, f"{crashes} attempts crashed", "REDELIVERY_LIMIT")
        finished = False
        try:
            settlement = self._run(job, delivery, run, lease, timings)
            finished = settlement.outcome is not Outcome.REQUEUE
            return settlement
        finally:
            lease.release(finished=finished)

    def _already_reported(
        self, job: TrainingJob, run: RunRef, outcome: OutcomeRecord
    ) -> Settlement:
        kind = outcome.event.kind
        if not outcome.delivered:
            log.warning("job %s (run %s): re-sending its %s webhook", job.job_id, run.run_id, kind)
            self.ledger.ensure_outbox(run, outcome)
            self.outbox.attempt(outbox_key(run.style_id, run.run_id), force=True)
        else:
            log.warning(
                "job %s (run %s) already reported (%s): acknowledging without training",
                job.job_id,
                run.run_id,
                kind,
            )
        code = outcome.event.error_code
        if code is None:
            return Settlement(Outcome.ACK)
        return Settlement(Outcome.REJECT, "the job failed earlier", code)

    # ------------------------------------------------------------------ the job
    def _job_dir(self, run: RunRef) -> Path:
        """This process's folder for the run: kept across a requeue, else a new one."""
        parent = Path(self.settings.work_dir) if self.settings.work_dir else None
        base = parent or Path(tempfile.gettempdir())
        # make_job_dir keeps the first 64 characters of the name (a run id needs no escaping)
        for folder in sorted(base.glob(f"ll-job-{run.run_id[:64]}-*")):
            if job_dir_owned_here(folder):
                return folder
        return make_job_dir(parent, run.run_id)

    def _run(
        self, job: TrainingJob, delivery: Delivery, run: RunRef, lease: Lease, timings: JobTimings
    ) -> Settlement:
        job_dir = self._job_dir(run)
        public = _PublicNames(job_dir)
        keep_dir = False
        try:
            with (
                self._report(job.webhook_url, run, delivery.body, rewrite=public) as report,
                CancelWatch(self.ledger, run, self.settings.cancel_poll_s) as watch,
            ):
                try:
                    self._download_and_train(
                        job, delivery, lease, timings, job_dir, report, public, watch
                    )
                except Exception as exc:
                    settlement, keep_dir = self._settle_error(job, exc, report, public)
                    if settlement.outcome is Outcome.ACK:  # cancelled
                        self._drop_checkpoints(run)
                    return settlement
            self._drop_checkpoints(run)
            self.jobs_done += 1
            return Settlement(Outcome.ACK)
        finally:
            if not keep_dir:
                shutil.rmtree(job_dir, ignore_errors=True)
            release_training_memory(self.callbacks)  # a stopped or failed job's trainer too

    def _download_and_train(
        self,
        job: TrainingJob,
        delivery: Delivery,
        lease: Lease,
        timings: JobTimings,
        job_dir: Path,
        report: JobReport,
        public: _PublicNames,
        watch: CancelWatch,
    ) -> None:
        t0 = time.monotonic()
        try:
            self._download(job, job_dir / "images", public)
        finally:
            timings.download_s = time.monotonic() - t0
        what = f"job {job.job_id} of style {job.style_id}"
        if watch.cancelled.is_set():
            raise JobCancelledError(f"{what} was cancelled by the backend while downloading")
        cfg = self.job_config(job, job_dir)
        extra: list[L.Callback] = [
            InterruptOnStop(delivery.stop_requested, lease),
            StopOnCancel(watch.cancelled, what),
        ]
        if self.metrics is not None:
            extra.append(ProgressGauge(self.metrics))
        t0 = time.monotonic()
        result = run_reported_training(
            cfg,
            report,
            self.storage,
            callbacks=[*extra, *self.callbacks],
            resume=self.settings.resume_from_s3,
            work_dir=job_dir / "resume",
            run_id=lease.run.run_id,
            style_token=job.style_token,
        )
        elapsed = time.monotonic() - t0
        timings.training_s = float(result.metrics.get("train_seconds", elapsed))
        timings.upload_s = float(result.metrics.get("upload_seconds", 0.0))
        timings.upload_and_report_s = max(0.0, elapsed - timings.training_s)

    @staticmethod
    def _settle_error(
        job: TrainingJob, exc: Exception, report: JobReport, public: _PublicNames
    ) -> tuple[Settlement, bool]:
        """How a job that raised is settled, by the one rule (after its one failure report).

        Returns:
            The settlement, and whether to keep the job's folder: a job requeued because S3 is
            down keeps it, so its finished LoRA (if any) is uploaded on the next delivery
            without training again.
        """
        disposition = disposition_of(exc)
        text = public(redact(str(exc)))
        if disposition.requeue:
            log.warning("job %s requeued: %s", job.job_id, text)
            keep = isinstance(disposition.error, StorageUnavailableError)
            return Settlement(Outcome.REQUEUE), keep
        report.fail(exc)  # nothing new if the runner reported it already
        code = disposition.error_code
        if not disposition.dead_letter:  # cancelled: reported, nothing left to look at
            log.warning("job %s ended (%s): %s", job.job_id, code, text)
            return Settlement(Outcome.ACK, text[:500], code), False
        log.error("job %s failed (%s): %s", job.job_id, code, text)
        return Settlement(Outcome.REJECT, text[:500], code), False

    def job_config(self, job: TrainingJob, job_dir: Path) -> DictConfig:
        """A copy of the training config with the job's folders and numbers set as values."""
        cfg = copy.deepcopy(self.train_cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(job_dir / "run")
            cfg.data.image_dir = str(job_dir / "images")
            for key, value in job_settings(job).items():
                OmegaConf.update(cfg, key, value, merge=False)
        return cfg

    def _drop_checkpoints(self, run: RunRef) -> None:
        try:
            prefix = checkpoint_prefix(run.style_id, run.run_id)
            self.storage.delete_keys(list_checkpoints(self.storage, prefix))
        except Exception as exc:  # they are small; a later cleanup can remove them
            log.warning("run %s: checkpoints not deleted: %s", run.run_id, redact(str(exc)))

    def _download(self, job: TrainingJob, dest: Path, public: _PublicNames) -> None:
        """Fetch the images and write the job's captions beside them, as plain text."""
        paths = self.storage.download_images(
            job.image_urls,
            dest,
            max_count=self.settings.max_images,
            max_bytes_per_file=self.settings.max_image_bytes,
            max_total_bytes=self.settings.max_total_bytes,
            allowed_buckets=self.settings.allowed_buckets or None,
        )
        for path, url in zip(paths, job.image_urls, strict=True):
            public.names[str(path)] = url
        for path, caption in zip(paths, self._captions(job), strict=True):
            if caption is not None:
                path.with_suffix(".txt").write_text(caption, encoding="utf-8")

    def _captions(self, job: TrainingJob) -> list[str | None]:
        """Each image's caption from the job, else the template with the job's style token."""
        captions = job.captions
        if isinstance(captions, dict):
            by_name = {url: captions.get(url.rsplit("/", 1)[-1]) for url in job.image_urls}
            own: list[str | None] = [by_name[url] or captions.get(url) for url in job.image_urls]
        elif isinstance(captions, list):
            own = [c or None for c in captions]
        else:
            own = [None] * len(job.image_urls)
        if job.style_token is None:
            return own
        template = str(self.train_cfg.data.caption_template)
        default = template.format(token=job.style_token)  # the token is a value, not a format
        return [c if c is not None else default for c in own]

    # ------------------------------------------------------------------ failures without a job
    def _report_unparsed(self, delivery: Delivery, exc: InvalidMessageError) -> None:
        style_id, webhook_url = peek_identity(delivery.body)
        if style_id is None or webhook_url is None:
            return
        if not webhook_allowed(webhook_url, self.settings.webhook_allowlist):
            log.warning("not reporting the invalid message: its webhook_url is not allow-listed")
            return
        key = job_key_for(delivery.message_id, delivery.body)
        try:
            run = self.ledger.resolve_run(style_id, key, new_publication=not delivery.redelivered)
        except StorageUnavailableError:
            # still heard, without the once-only record: the same report, sent in-process
            with JobReport(self._client(webhook_url), style_id) as report:
                report.fail(exc)
            return
        self._fail_once(webhook_url, run, delivery.body, exc)


class _PublicNames:
    """Rewrites a job's local file paths in messages into the S3 URLs the backend knows."""

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = str(job_dir)
        self.names: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        for local in sorted(self.names, key=len, reverse=True):
            text = text.replace(local, self.names[local])
        return text.replace(self.job_dir, "<job folder>")
