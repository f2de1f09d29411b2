"""Memory logging: GPU memory (allocated, reserved, peak) or, on CPU, the process RSS.

:class:`VramCallback` measures every ``every_n_steps`` optimizer steps and at each epoch end,
writes the figures (GiB) to every Lightning logger of the trainer (CSV, TensorBoard...) and to
the process log, and keeps the run's peaks. With ``logger=null`` it still measures, logs to the
process log and records the peaks; the latest figures also reach ``trainer.callback_metrics``
(through ``pl_module.log(..., logger=False)``) and so ``TrainResult.metrics``.

Logged metric names (``prefix`` defaults to ``mem``):

* on CUDA: ``mem/allocated_gib``, ``mem/reserved_gib``, ``mem/peak_gib`` (peak allocated since
  the start of this fit), plus ``mem/rss_gib``;
* on CPU (or any non-CUDA device): ``mem/rss_gib`` and ``mem/peak_rss_gib``.

The peaks of the whole run are :attr:`VramCallback.peak_gib` and :attr:`VramCallback.peak_rss_gib`
and :meth:`VramCallback.summary`, which :func:`lightning_lora.training.run.train` merges into the
run's metrics (``peak_vram_gib``, ``peak_rss_gib``) and :mod:`lightning_lora.jobs.runner` puts into
the completion webhook's metadata.

Config: ``configs/callbacks/vram.yaml`` (included by ``callbacks=production``).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import psutil
import torch
from typing_extensions import override

log = logging.getLogger(__name__)

GIB = 1024**3


class VramCallback(L.Callback):
    """Logs memory use every N steps and keeps the run's peak.

    Attributes:
        peak_gib: Peak GPU memory allocated during this fit, in GiB (``None`` off CUDA).
        peak_reserved_gib: Peak GPU memory reserved by the caching allocator (``None`` off CUDA).
        peak_rss_gib: Peak resident set size of this process sampled during the fit, in GiB.
        last: The latest measurement (metric name -> GiB).
    """

    def __init__(
        self, every_n_steps: int = 50, prefix: str = "mem", log_level: int = logging.INFO
    ) -> None:
        """Configure.

        Args:
            every_n_steps: Measure every this many optimizer steps (and at every epoch end).
            prefix: Metric name prefix.
            log_level: Level of the process-log line (``logging.INFO`` by default).
        """
        self.every_n_steps = max(1, int(every_n_steps))
        self.prefix = prefix.rstrip("/")
        self.log_level = log_level
        self.peak_gib: float | None = None
        self.peak_reserved_gib: float | None = None
        self.peak_rss_gib: float = 0.0
        self.last: dict[str, float] = {}
        self._last_step = -1
        self._process = psutil.Process()

    # ----------------------------------------------------------------- measuring

    @staticmethod
    def _cuda_device(pl_module: L.LightningModule) -> torch.device | None:
        device = pl_module.device
        if device.type == "cuda" and torch.cuda.is_available():
            return device
        return None

    def _rss_gib(self) -> float:
        try:
            return self._process.memory_info().rss / GIB
        except (psutil.Error, OSError) as exc:  # never fail training over a measurement
            log.debug("could not read process RSS: %s", exc)
            return 0.0

    def measure(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Take one measurement and update the peaks.

        Args:
            pl_module: The module being trained (its device selects CUDA or CPU figures).

        Returns:
            Metric name -> GiB.
        """
        p = self.prefix
        rss = self._rss_gib()
        self.peak_rss_gib = max(self.peak_rss_gib, rss)
        figures = {f"{p}/rss_gib": rss}
        device = self._cuda_device(pl_module)
        if device is None:
            figures[f"{p}/peak_rss_gib"] = self.peak_rss_gib
        else:
            allocated = torch.cuda.memory_allocated(device) / GIB
            reserved = torch.cuda.memory_reserved(device) / GIB
            peak = torch.cuda.max_memory_allocated(device) / GIB
            peak_reserved = torch.cuda.max_memory_reserved(device) / GIB
            self.peak_gib = max(self.peak_gib or 0.0, peak)
            self.peak_reserved_gib = max(self.peak_reserved_gib or 0.0, peak_reserved)
            figures.update(
                {
                    f"{p}/allocated_gib": allocated,
                    f"{p}/reserved_gib": reserved,
                    f"{p}/peak_gib": self.peak_gib,
                }
            )
        self.last = figures
        return figures

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, on_step: bool) -> None:
        figures = self.measure(pl_module)
        step = trainer.global_step
        # Loggers directly, so the figures are written whatever trainer.log_every_n_steps is;
        # pl_module.log(logger=False) keeps them in callback_metrics (and TrainResult.metrics).
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(figures, step=step)
        for name, value in figures.items():
            pl_module.log(
                name, value, on_step=on_step, on_epoch=not on_step, logger=False, batch_size=1
            )
        p = self.prefix
        if f"{p}/allocated_gib" in figures:
            log.log(
                self.log_level,
                "memory at step %d: allocated %.3f GiB, reserved %.3f GiB, peak %.3f GiB, "
                "RSS %.3f GiB",
                step,
                figures[f"{p}/allocated_gib"],
                figures[f"{p}/reserved_gib"],
                figures[f"{p}/peak_gib"],
                figures[f"{p}/rss_gib"],
            )
        else:
            log.log(
                self.log_level,
                "memory at step %d: RSS %.3f GiB, peak RSS %.3f GiB (no CUDA device)",
                step,
                figures[f"{p}/rss_gib"],
                self.peak_rss_gib,
            )

    # ----------------------------------------------------------------- hooks

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = self._cuda_device(pl_module)
        if device is not None:
            torch.cuda.reset_peak_memory_stats(device)  # the peak of this run, not the process
        self.peak_gib = None
        self.peak_reserved_gib = None
        self.peak_rss_gib = 0.0
        self._last_step = -1
        self.measure(pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0:
            self._last_step = step
            self._report(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, on_step=False)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(pl_module)  # last peak; logging is not allowed in this hook
        if trainer.is_global_zero:
            log.log(self.log_level, "memory peak of the run: %s", self._peak_text())

    def _peak_text(self) -> str:
        if self.peak_gib is not None:
            return f"{self.peak_gib:.3f} GiB GPU allocated, RSS {self.peak_rss_gib:.3f} GiB"
        return f"RSS {self.peak_rss_gib:.3f} GiB"

    def summary(self) -> dict[str, float]:
        """The run's memory peaks in GiB.

        Returns:
            ``peak_rss_gib`` and, on CUDA, ``peak_vram_gib`` and ``peak_vram_reserved_gib``.
        """
        out = {"peak_rss_gib": self.peak_rss_gib}
        if self.peak_gib is not None:
            out["peak_vram_gib"] = self.peak_gib
        if self.peak_reserved_gib is not None:
            out["peak_vram_reserved_gib"] = self.peak_reserved_gib
        return out
