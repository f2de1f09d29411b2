"""The worker's own training callbacks: stop on shutdown, a lost lease or a cancel; progress."""

from __future__ import annotations

import threading
from typing import Any

import lightning as L
from typing_extensions import override

from lightning_lora.callbacks.s3_checkpoint import S3CheckpointCallback
from lightning_lora.errors import JobCancelledError, JobInterrupted
from lightning_lora.worker.ledger import Lease
from lightning_lora.worker.ops import WorkerMetrics

__all__ = ["InterruptOnStop", "ProgressGauge", "StopOnCancel"]


class InterruptOnStop(L.Callback):
    """Ends training when the worker stops (after an S3 checkpoint) or loses the job's lease.

    Raises :class:`JobInterrupted` (not a failure: nothing is reported) so that the worker
    requeues the message; the redelivered job resumes from the checkpoint.
    """

    def __init__(self, stop: threading.Event, lease: Lease | None = None) -> None:
        """Watch ``stop`` (the consumer's shutdown event) and ``lease.lost``."""
        self.stop = stop
        self.lease = lease

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.lease is not None and self.lease.lost.is_set():
            raise JobInterrupted("another worker took over the job's lease; stopped")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.stop.is_set():
            return
        for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
            if isinstance(callback, S3CheckpointCallback):
                callback.checkpoint_now(trainer)
                callback.wait()
        raise JobInterrupted(
            f"worker shutting down: stopped after epoch {trainer.current_epoch + 1}, checkpointed"
        )


class StopOnCancel(L.Callback):
    """Ends training at the next step once the job's style is cancelled.

    Raises :class:`JobCancelledError`: the job is reported ``CANCELLED`` once, its checkpoints
    are deleted and its message acknowledged (:mod:`lightning_lora.worker.cancels`).
    """

    def __init__(self, cancelled: threading.Event, what: str) -> None:
        """Watch ``cancelled`` (set by a :class:`~lightning_lora.worker.cancels.CancelWatch`)."""
        self.cancelled = cancelled
        self.what = what

    def _check(self, trainer: L.Trainer) -> None:
        if self.cancelled.is_set():
            raise JobCancelledError(
                f"{self.what} was cancelled by the backend; stopped at step {trainer.global_step}"
            )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._check(trainer)


class ProgressGauge(L.Callback):
    """Feeds the metrics' current-job progress gauge (share of optimizer steps done)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        """Feed ``metrics.set_progress``."""
        self.metrics = metrics
        self._total = 0.0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = float(trainer.estimated_stepping_batches or 0)  # once, not every step

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._total > 0:
            self.metrics.set_progress(min(1.0, trainer.global_step / self._total))
