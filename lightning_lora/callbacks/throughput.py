"""Training speed: samples/s and the run's timing, measured without syncing the device."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from typing_extensions import override


class ThroughputCallback(L.Callback):
    """Logs ``perf/samples_per_s`` every ``log_every_n_steps`` and keeps run-level figures.

    It reads the wall clock only (no device synchronisation in the step); over a logging window
    of many steps, queued device work is accounted for by the steps that wait on it.

    Attributes:
        samples: Samples trained so far in this process.
        train_seconds: Wall time of the training loop so far.
        samples_per_s: Latest windowed throughput (``None`` before the first window).
    """

    def __init__(self, log_every_n_steps: int = 10) -> None:
        """Configure.

        Args:
            log_every_n_steps: Window length in optimizer steps.
        """
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.samples = 0
        self.train_seconds = 0.0
        self.samples_per_s: float | None = None
        self._start: float | None = None
        self._window_start: float | None = None
        self._window_samples = 0

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        self._start = now if self._start is None else self._start
        self._window_start = now
        self._window_samples = 0

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        n = _batch_size(batch)
        self.samples += n
        self._window_samples += n
        if trainer.global_step % self.log_every_n_steps == 0 and self._window_start is not None:
            now = time.perf_counter()
            elapsed = now - self._window_start
            if elapsed > 0:
                self.samples_per_s = self._window_samples / elapsed
                pl_module.log("perf/samples_per_s", self.samples_per_s, prog_bar=True)
            self._window_start, self._window_samples = now, 0

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:
            self.train_seconds = time.perf_counter() - self._start

    def summary(self) -> dict[str, float]:
        """Run-level figures: samples, training seconds and mean samples/s."""
        mean = self.samples / self.train_seconds if self.train_seconds > 0 else 0.0
        return {
            "samples": float(self.samples),
            "train_seconds": self.train_seconds,
            "samples_per_s": mean,
        }


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for key in ("latent_params", "pixel_values"):
            if key in batch:
                return int(batch[key].shape[0])
    return 0
