"""Clocks and counters of the benchmark.

Device sync, peak memory and compile counts, and the Lightning callbacks that time a window of
training steps (:class:`StepTimer`) or the phases of a whole job (:class:`PhaseTimer`).
"""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch


def cuda_sync() -> None:
    """Wait for the device (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib(n: float | int | None) -> float | None:
    """Bytes to GiB (``None`` stays ``None``)."""
    return None if n is None else n / 2**30


def peak_memory() -> int | None:
    """Peak allocated device memory since the last reset (``None`` on CPU)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def reset_peak_memory() -> None:
    """Reset the device's peak-memory statistics (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def free_memory() -> None:
    """Collect garbage and return cached device blocks, so cases do not see each other's."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dynamo_counts() -> dict[str, int]:
    """Graphs and frames ``torch.compile`` has compiled so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return {}
    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "frames_ok": int(counters["frames"]["ok"]),
    }


def attention_processors(unet: torch.nn.Module) -> dict[str, int]:
    """Count the UNet's attention processor classes (``AttnProcessor2_0`` = PyTorch SDPA)."""
    processors = getattr(unet, "attn_processors", {})
    return dict(Counter(type(p).__name__ for p in processors.values()))


class StepTimer(L.Callback):
    """Times steps ``warmup+1 .. warmup+steps`` of a fit, then optionally audits syncs.

    The device is synchronised at the two ends of the window only. After the window,
    ``audit_steps`` more steps run with ``torch.cuda.set_sync_debug_mode("warn")``, counting the
    host-device synchronisations (``.item()``, blocking copies, ...) and where they come from.
    """

    def __init__(self, warmup: int, steps: int, audit_steps: int = 0) -> None:
        """Configure.

        Args:
            warmup: Steps before the window (compilation and CUDA-graph recording happen here).
            steps: Steps in the window.
            audit_steps: Steps after the window with sync debugging on (CUDA only).
        """
        self.warmup, self.steps, self.audit_steps = warmup, steps, audit_steps
        self.fit_start: float | None = None
        self.first_batch: float | None = None
        self.window_start: float | None = None
        self.window_end: float | None = None
        self.peak_prepare: int | None = None
        self.peak_window: int | None = None
        self.syncs: list[str] = []
        self.unet: torch.nn.Module | None = None
        self._audit: contextlib.ExitStack | None = None
        self._records: list[warnings.WarningMessage] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cuda_sync()
        reset_peak_memory()
        self.fit_start = time.perf_counter()
        self.unet = getattr(pl_module, "unet", None)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.first_batch is None:
            cuda_sync()
            self.first_batch = time.perf_counter()
        if step == self.warmup and self.window_start is None:
            cuda_sync()
            self.peak_prepare = peak_memory()
            reset_peak_memory()
            self.window_start = time.perf_counter()
        if (
            step == self.warmup + self.steps
            and self.audit_steps
            and torch.cuda.is_available()
            and self._audit is None
        ):
            self._audit = contextlib.ExitStack()
            self._records = self._audit.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self._audit.callback(torch.cuda.set_sync_debug_mode, "default")

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self.warmup + self.steps and self.window_end is None:
            cuda_sync()
            self.window_end = time.perf_counter()
            self.peak_window = peak_memory()
        if step == self.warmup + self.steps + self.audit_steps:
            self._close_audit()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_audit()

    def _close_audit(self) -> None:
        if self._audit is None:
            return
        self._audit.close()
        self._audit = None
        for record in self._records:
            if "synchroniz" in str(record.message):
                self.syncs.append(f"{Path(record.filename).name}:{record.lineno}")

    @property
    def step_s(self) -> float:
        """Mean seconds per timed step."""
        if self.window_start is None or self.window_end is None:
            raise RuntimeError("the timed window did not complete; too few training steps?")
        return (self.window_end - self.window_start) / self.steps


class PhaseTimer(L.Callback):
    """Wall-clock phases of one training job (device synchronised at each boundary)."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"start": time.perf_counter()}
        self.checkpoints = 0

    def _mark(self, name: str) -> None:
        cuda_sync()
        self.marks.setdefault(name, time.perf_counter())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._mark("setup")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("fit_start")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("train_start")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 1:
            self._mark("first_step_end")

    def on_save_checkpoint(self, *args: Any) -> None:
        self.checkpoints += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("train_end")

    def phases(self, end: float) -> dict[str, float]:
        """Seconds per phase, ending at ``end`` (after ``train()`` returned)."""
        m = self.marks
        out = {
            "config_and_model_s": m.get("setup", end) - m["start"],
            "cache_and_setup_s": m.get("train_start", end) - m.get("setup", m["start"]),
            "first_step_s": m.get("first_step_end", end) - m.get("train_start", end),
            "training_s": m.get("train_end", end) - m.get("train_start", end),
            "export_s": end - m.get("train_end", end),
        }
        return {k: round(v, 4) for k, v in out.items()}
