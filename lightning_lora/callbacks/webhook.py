"""Training progress and failure webhooks, sent from a Lightning callback.

:class:`WebhookCallback` reports to the platform backend (contract: ``PATCH
{webhook_url}/api/webhooks/training/progress`` and ``POST .../failed``, see
:mod:`lightning_lora.clients.webhook_client`) through a
:class:`~lightning_lora.clients.webhook_sender.WebhookSender`, so the training loop never waits on
the network:

* **progress**: one report when training starts, then at most one per ``interval_s`` seconds of
  wall time (checked after every optimizer step and epoch), and one at 100% when training ends.
  ``current_epoch`` is the number of epochs done (after a resume it starts at the resumed epoch),
  ``progress_percent`` is the share of optimizer steps done (``trainer.global_step`` out of
  ``trainer.estimated_stepping_batches``, capped at 99 until the end) and ``estimated_seconds``
  is the steps left times the wall time per step *measured in this process* (only the steps run
  since this process started training count, so a resumed run is not credited with the earlier
  run's steps). Before the first step there is no measurement yet and ``estimated_seconds`` is 0.
* **failure**: Lightning's ``on_exception`` hook sends ``{"style_id", "error_message",
  "error_code"}`` with the code from :func:`lightning_lora.errors.error_code_of`. The message is
  redacted and truncated by the client.

The **completion** webhook needs the model URL, which exists only after the LoRA was exported
and uploaded, i.e. after ``train()`` returned: :meth:`WebhookCallback.report_completion` sends it
(see :func:`lightning_lora.reporting.run_reported_training`, which also reports failures that
happen outside ``trainer.fit``). The once-only rule belongs to the job's
:class:`~lightning_lora.job_report.JobReport`, which the callback reports through: whoever
reports first (this callback, the reporting code or the worker) is the only terminal report.

Only global rank zero sends anything.

Config: ``reporting.webhook`` (``configs/reporting/default.yaml``) is a ``_partial_`` target:
the job's report (its ``style_id`` and ``webhook_url``) comes in at run time, so
:func:`lightning_lora.reporting.run_reported_training` completes it per job.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L

from lightning_lora.clients.webhook_client import WebhookClient
from lightning_lora.clients.webhook_sender import WebhookSender
from lightning_lora.job_report import JobReport, error_message_of

__all__ = ["WebhookCallback", "error_message_of"]

log = logging.getLogger(__name__)


class WebhookCallback(L.Callback):
    """Sends progress reports during training and a failure report if training raises.

    Attributes:
        report: The job's report (progress and the one terminal report).
        sender: The sender progress goes through.
        style_id: The style being trained.
        interval_s: Least wall time between two progress reports (start and end excepted).
        progress_reports: Number of progress reports posted.
        start_epoch: Epoch at which this process started training (> 0 after a resume).
        start_step: ``global_step`` at which this process started training.
    """

    def __init__(
        self,
        report: JobReport | WebhookSender | WebhookClient,
        style_id: int | None = None,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Configure.

        Args:
            report: The job's :class:`JobReport`, or a :class:`WebhookSender` (the caller owns,
                flushes and closes it) or :class:`WebhookClient` (wrapped in a new sender, owned
                by the caller through :attr:`sender`) for which a report is made.
            style_id: The style being trained (taken from ``report`` when it is a JobReport).
            interval_s: Least seconds between two progress reports (30 in production).
            clock: Monotonic clock (seconds), replaceable for tests.
        """
        if interval_s < 0:
            raise ValueError("interval_s must be >= 0")
        if not isinstance(report, JobReport):
            if style_id is None:
                raise TypeError("style_id is required unless a JobReport is given")
            report = JobReport(report, style_id)
        elif style_id is not None and style_id != report.style_id:
            raise ValueError(f"style_id {style_id} differs from the report's {report.style_id}")
        self.report = report
        self.sender = report.sender
        self.style_id = report.style_id
        self.interval_s = float(interval_s)
        self.clock = clock
        self.progress_reports = 0
        self.start_epoch = 0
        self.start_step = 0
        self._t0: float | None = None
        self._last_sent: float | None = None
        self._total_steps: float = math.inf

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(style_id={self.style_id}, interval_s={self.interval_s}, "
            f"sender={self.sender!r})"
        )

    # ----------------------------------------------------------------- progress

    @staticmethod
    def _total_epochs(trainer: L.Trainer) -> int:
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return 0
        return int(max_epochs)

    def progress(self, trainer: L.Trainer, epochs_done: int) -> tuple[int, int, int, int]:
        """Compute a progress report from the trainer's counters and this process's timing.

        Args:
            trainer: The trainer.
            epochs_done: Epochs completed so far.

        Returns:
            ``(current_epoch, total_epochs, progress_percent, estimated_seconds)``.
        """
        total_epochs = self._total_epochs(trainer)
        step = trainer.global_step
        total = self._total_steps
        if math.isfinite(total) and total > 0:
            fraction = min(1.0, step / total)
            steps_left = max(0.0, total - step)
        elif total_epochs > 0:
            fraction = min(1.0, epochs_done / total_epochs)
            steps_left = math.nan
        else:
            fraction, steps_left = 0.0, math.nan
        percent = min(99, int(100 * fraction))  # 100 is for the end of training only
        eta = 0
        steps_here = step - self.start_step
        if self._t0 is not None and steps_here > 0 and math.isfinite(steps_left):
            per_step = (self.clock() - self._t0) / steps_here
            eta = math.ceil(per_step * steps_left)
        return epochs_done, total_epochs, percent, eta

    def summary(self) -> dict[str, float]:
        """Run facts for the metrics: the epoch this process resumed from, after a resume."""
        return {"resumed_from_epoch": float(self.start_epoch)} if self.start_epoch > 0 else {}

    @property
    def terminal(self) -> str | None:
        """``"complete"`` or ``"failed"`` once the job's terminal report was taken."""
        return self.report.terminal_kind

    def _post(self, report: tuple[int, int, int, int]) -> None:
        current, total, percent, eta = report
        if self.report.progress(current, total, percent, eta):
            self.progress_reports += 1
        self._last_sent = self.clock()
        log.debug(
            "progress style %s: epoch %d/%d, %d%%, ~%ds left",
            self.style_id,
            current,
            total,
            percent,
            eta,
        )

    def _maybe_post(self, trainer: L.Trainer, epochs_done: int) -> None:
        if not trainer.is_global_zero or self.terminal is not None:
            return
        now = self.clock()
        if self._last_sent is not None and now - self._last_sent < self.interval_s:
            return
        self._post(self.progress(trainer, epochs_done))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a resume Lightning has restored the loops: current_epoch/global_step continue.
        self.start_epoch = trainer.current_epoch
        self.start_step = trainer.global_step
        self._t0 = self.clock()
        self._last_sent = None
        try:
            self._total_steps = float(trainer.estimated_stepping_batches)
        except Exception as exc:  # e.g. an iterable dataset without a length
            log.debug("no step estimate for progress reports: %s", exc)
            self._total_steps = math.inf
        if trainer.is_global_zero and self.terminal is None:
            self._post(self.progress(trainer, trainer.current_epoch))

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._maybe_post(trainer, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_post(trainer, trainer.current_epoch + 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.terminal is not None:
            return
        epochs = trainer.current_epoch
        total = self._total_epochs(trainer) or epochs
        self._post((epochs, total, 100, 0))

    # ----------------------------------------------------------------- terminal reports

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.is_global_zero:
            self.report_failure(exception)

    def report_failure(self, exc: BaseException) -> bool:
        """Report ``exc`` as the job's failure (through :attr:`report`; once per job).

        Never raises. A :class:`~lightning_lora.errors.JobInterrupted` reports nothing.

        Returns:
            Whether a failure report was taken now.
        """
        return self.report.fail(exc)

    def report_completion(self, model_url: str, metadata: Mapping[str, Any]) -> bool:
        """Report the completion (through :attr:`report`; once per job).

        Args:
            model_url: ``s3://`` URL of the uploaded LoRA.
            metadata: Training facts (see :func:`lightning_lora.reporting.completion_metadata`).

        Returns:
            Whether a completion report was taken now.

        Raises:
            TypeError, ValueError: The arguments cannot form a valid payload (nothing is marked
                as sent, so a failure can still be reported).
        """
        return self.report.complete(model_url, metadata)
