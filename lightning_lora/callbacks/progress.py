"""Training progress webhooks, sent from a Lightning callback.

:class:`ProgressCallback` reports progress to the platform backend (contract: ``PATCH
{webhook_url}/api/webhooks/training/progress``) through the job's report (a
:class:`ProgressReport`, in practice :class:`~lightning_lora.jobs.report.JobReport`), whose
background sender keeps the training loop from waiting on the network:

* one report when training starts, then at most one per ``interval_s`` seconds of wall time
  (checked after every optimizer step and epoch), and one at 100% when training ends;
* ``current_epoch`` is the number of epochs done (after a resume it starts at the resumed
  epoch), ``progress_percent`` is the share of optimizer steps done (``trainer.global_step`` out
  of ``trainer.estimated_stepping_batches``, capped at 99 until the end) and
  ``estimated_seconds`` is the steps left times the wall time per step *measured in this
  process* (only the steps run since this process started training count, so a resumed run is
  not credited with the earlier run's steps). Before the first step there is no measurement yet
  and ``estimated_seconds`` is 0.

The job's end (completion or failure) is not this callback's: the runner sends it through the
same report once ``fit`` returned or raised. After an exception (``on_exception``) the callback
sends no more progress. Only global rank zero sends anything.

Config: ``reporting.webhook`` (``configs/reporting/default.yaml``) is a ``_partial_`` target:
the job's report comes in at run time, so :func:`lightning_lora.jobs.runner.run_reported_training`
completes it per job.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import lightning as L
from typing_extensions import override

__all__ = ["ProgressCallback", "ProgressReport"]

log = logging.getLogger(__name__)


class ProgressReport(Protocol):
    """What the callback reports progress to (a job's report)."""

    style_id: int

    def progress(
        self, current_epoch: int, total_epochs: int, percent: int, estimated_seconds: int
    ) -> bool:
        """Queue a progress report; ``False`` when it was not taken (the job already ended)."""
        ...


class ProgressCallback(L.Callback):
    """Sends progress reports during training (the job's end is the runner's).

    Attributes:
        report: Where progress goes (the job's report).
        style_id: The style being trained.
        interval_s: Least wall time between two progress reports (start and end excepted).
        progress_reports: Number of progress reports posted.
        start_epoch: Epoch at which this process started training (> 0 after a resume).
        start_step: ``global_step`` at which this process started training.
    """

    def __init__(
        self,
        report: ProgressReport,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Configure.

        Args:
            report: The job's report (:class:`~lightning_lora.jobs.report.JobReport`).
            interval_s: Least seconds between two progress reports (30 in production).
            clock: Monotonic clock (seconds), replaceable for tests.
        """
        if interval_s < 0:
            raise ValueError("interval_s must be >= 0")
        self.report = report
        self.style_id = report.style_id
        self.interval_s = float(interval_s)
        self.clock = clock
        self.progress_reports = 0
        self.start_epoch = 0
        self.start_step = 0
        self._t0: float | None = None
        self._last_sent: float | None = None
        self._total_steps: float = math.inf
        self._ended = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(style_id={self.style_id}, interval_s={self.interval_s})"

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
        if not trainer.is_global_zero or self._ended:
            return
        now = self.clock()
        if self._last_sent is not None and now - self._last_sent < self.interval_s:
            return
        self._post(self.progress(trainer, epochs_done))

    @override
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
        if trainer.is_global_zero and not self._ended:
            self._post(self.progress(trainer, trainer.current_epoch))

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._maybe_post(trainer, trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_post(trainer, trainer.current_epoch + 1)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self._ended:
            return
        epochs = trainer.current_epoch
        total = self._total_epochs(trainer) or epochs
        self._post((epochs, total, 100, 0))

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._ended = True  # the runner reports the job's end; no progress after it
