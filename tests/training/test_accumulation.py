"""Gradient accumulation (`trainer.accumulate_grad_batches`): all counts are optimizer steps."""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_lora.callbacks.progress import ProgressCallback
from lightning_lora.training.run import train


class _Report:
    """A progress receiver that keeps every report (the job's report's interface)."""

    style_id = 1

    def __init__(self) -> None:
        self.reports: list[tuple[int, int, int, int]] = []

    def progress(self, current: int, total: int, percent: int, eta: int) -> bool:
        self.reports.append((current, total, percent, eta))
        return True


class _Record(L.Callback):
    """Per batch: the optimizer steps, the LR and the EMA updates before it; a clock of batches."""

    def __init__(self) -> None:
        self.batches = 0
        self.rows: list[tuple[int, float, int]] = []
        self.progress: ProgressCallback | None = None
        #: ``(batches, optimizer steps, progress percent, ETA seconds)`` after each batch
        self.reports: list[tuple[int, int, int, int]] = []

    def _row(self, trainer: L.Trainer, pl_module: Any) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append((trainer.global_step, lr, pl_module.ema.model.optimization_step))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self._row(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.batches += 1  # the fake clock: one second per batch
        assert self.progress is not None
        _, _, percent, eta = self.progress.progress(trainer, trainer.current_epoch)
        self.reports.append((self.batches, trainer.global_step, percent, eta))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._row(trainer, pl_module)


def test_scheduler_ema_and_progress_count_optimizer_steps(make_cfg) -> None:
    record = _Record()
    report = _Report()
    progress = ProgressCallback(report, interval_s=0, clock=lambda: float(record.batches))
    record.progress = progress
    cfg = make_cfg(
        "trainer.accumulate_grad_batches=2",
        "data.batch_size=2",  # 8 images: 4 batches, 2 optimizer steps an epoch
        "module/scheduler=constant_warmup",
        "module.scheduler.num_warmup_steps=4",
        "module.optimizer.lr=1e-3",
        "module.ema.enabled=true",
        "callbacks=none",
    )
    result = train(cfg, callbacks=[record, progress])
    assert record.batches == 8 and result.metadata["steps"] == 4
    # before each of the 8 batches: optimizer steps, LR (warm-up over 4 steps), EMA updates
    steps = [row[0] for row in record.rows]
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    for step, lr, ema_updates in record.rows:
        assert abs(lr - 1e-3 * min(1.0, step / 4)) < 1e-12  # one scheduler step per optimizer step
        assert ema_updates == step  # one EMA update per optimizer step
    # progress: 4 optimizer steps in all, the ETA is the optimizer steps left x the seconds per
    # optimizer step (2 batches = 2 s): after an even batch, elapsed + ETA = the 8 s of the run
    assert [r[1] for r in record.reports] == [0, 1, 1, 2, 2, 3, 3, 4]
    for batches, step, percent, eta in record.reports:
        assert percent == min(99, 25 * step)
        if batches % 2 == 0:
            assert batches + eta == 8, record.reports
    assert report.reports[-1][2] == 100 and max(r[2] for r in report.reports[:-1]) == 99
