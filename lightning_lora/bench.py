"""``lightning-lora-bench``: the project's training step timed against the diffusers reference.

Both sides run in one process on one device, after warm-up:

* **reference**: ``reference_samples_per_s`` of the shared ``sd15_lora_reference.py`` (diffusers'
  ``train_text_to_image_lora.py`` step: VAE and text encoder run every step, fp16 autocast with a
  GradScaler, plain AdamW). The file is imported, not copied: ``$LIGHTNING_LORA_REFERENCE`` (the
  file or its folder), else ``<repo>/../shared/bench``, else ``<repo>/shared/bench``.
* **ours**: a real ``lightning_lora.train.train(cfg)`` run (Hydra config, ``Trainer.fit``,
  ``LoRAModule.training_step``, Lightning's optimizer step with gradient clipping, logging and
  callbacks) over cached latents of a synthetic image folder. A callback synchronises the device
  and reads the clock at the start of step ``warmup + 1`` and at the end of step
  ``warmup + steps``: everything Lightning does in between is timed, nothing else. Per-epoch
  checkpoints and validation are switched off for these cases (they are measured by ``job``).
* **job**: a whole training job as a warm worker runs it (``train(cfg)`` with the default
  callbacks: validation loss every 10 epochs, checkpoints unless ``nockpt``), split into phases.
  Run after an ``ours`` case with the same settings, it shows whether a new job (a new LoRA)
  reuses the compiled UNet (``graphs_compiled`` counts the graphs compiled during the job).

The model has SD1.5's architecture (the reference's ``UNET``/``VAE``/``CLIP`` config dicts, or its
``TINY_*`` dicts with ``--tiny``) with random weights, saved once as a diffusers folder and loaded
through :func:`lightning_lora.models.load_components` like a real model; the tokenizer is the tiny
model's character-level CLIP tokenizer. MFU is model FLOPs (the reference's ``unet_train_flops``:
UNet forward plus LoRA-training backward, no recomputation) times samples/s over the device's
matrix rate (``--peak-tflops``; 790 TFLOP/s, the bf16 rate measured on this project's H200s).

Examples::

    lightning-lora-bench                                # CUDA: SD1.5 shapes, b4 and b16
    lightning-lora-bench --tiny --batch-sizes 2 --steps 3 --warmup 1 --json bench.json
    lightning-lora-bench --case ref:4:gc --case ours:4:gc --case ours:4:reduce-overhead
        --case job:4:reduce-overhead:images=20:epochs=100 --json bench.json   # (one line)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_ENV = "LIGHTNING_LORA_REFERENCE"
REFERENCE_FILE = "sd15_lora_reference.py"
#: Dense bf16 matrix rate (TFLOP/s) measured on this project's lent H200 machines (an 8192^3
#: bf16 matmul on random data); the datasheet says about 990.
MEASURED_PEAK_TFLOPS = {"H200": 790.0}
#: Bump when the random-weight model folder's build changes.
MODEL_FOLDER_VERSION = "v1"
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
PRECISIONS = ("bf16-mixed", "16-mixed", "32-true", "32", "bf16-true")
#: No per-epoch checkpoints (without a ModelCheckpoint, Lightning would add its own).
NO_CHECKPOINTS = ("~callbacks.model_checkpoint", "++trainer.enable_checkpointing=false")


# --------------------------------------------------------------------------------- the reference
def reference_path() -> Path:
    """Locate the shared reference recipe ``sd15_lora_reference.py``.

    Returns:
        The file: ``$LIGHTNING_LORA_REFERENCE`` (a file or a folder holding it), else
        ``<repo>/../shared/bench`` (a checkout with ``shared/`` beside it, as in CI), else
        ``<repo>/shared/bench``.

    Raises:
        FileNotFoundError: Naming the places searched.
    """
    env = os.environ.get(REFERENCE_ENV)
    candidates = (
        [Path(env)]
        if env
        else [REPO_ROOT.parent / "shared" / "bench", REPO_ROOT / "shared" / "bench"]
    )
    for candidate in candidates:
        path = candidate / REFERENCE_FILE if candidate.is_dir() else candidate
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"{REFERENCE_FILE} not found in {', '.join(map(str, candidates))}; set {REFERENCE_ENV}"
    )


def load_reference() -> ModuleType:
    """Import the reference recipe module from :func:`reference_path` (once per process)."""
    path = reference_path()
    name = "sd15_lora_reference"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Attributes:
        recipe: ``reference``, ``ours`` (timed steps) or ``job`` (a whole warm-worker job).
        batch_size: Samples per step.
        grad_ckpt: Gradient checkpointing of the UNet.
        compile_mode: ``torch.compile`` mode of the UNet (ours and job).
        precision: Lightning precision (ours and job); the reference uses fp16 autocast on CUDA
            and bf16 on CPU whatever this says.
        images: Training images of a job.
        epochs: Epochs of a job.
        checkpoints: Whether a job keeps the default per-epoch Lightning checkpoints.
    """

    recipe: str
    batch_size: int
    grad_ckpt: bool = False
    compile_mode: str = "none"
    precision: str = "bf16-mixed"
    images: int = 20
    epochs: int = 100
    checkpoints: bool = True

    @property
    def label(self) -> str:
        """Short spec-like name, e.g. ``ours:b4:gc:reduce-overhead:bf16-mixed``."""
        parts = [self.recipe, f"b{self.batch_size}", "gc" if self.grad_ckpt else "nogc"]
        if self.recipe != "reference":
            parts += [self.compile_mode, self.precision]
        if self.recipe == "job":
            parts += [f"{self.images}img", f"{self.epochs}ep"]
            parts += [] if self.checkpoints else ["nockpt"]
        return ":".join(parts)


def parse_case(spec: str, precision: str = "bf16-mixed") -> Case:
    """Parse ``recipe:batch[:option...]``.

    Options: ``gc``/``nogc``, a compile mode (``none``, ``default``, ``reduce-overhead``,
    ``max-autotune``), a precision (``bf16-mixed``, ``16-mixed``, ``32-true``), and for jobs
    ``images=N``, ``epochs=N`` and ``nockpt``. ``ref`` is short for ``reference``.

    Args:
        spec: The case, e.g. ``ref:4:gc``, ``ours:16:default``, ``job:4:reduce-overhead:nockpt``.
        precision: Precision when the spec names none.

    Returns:
        The case.

    Raises:
        ValueError: On an unknown recipe or option.
    """
    head, *options = spec.strip().split(":")
    recipe = {"ref": "reference"}.get(head, head)
    if recipe not in ("reference", "ours", "job") or not options:
        raise ValueError(f"bad case {spec!r}: expected reference|ours|job:BATCH[:options]")
    fields: dict[str, Any] = {"recipe": recipe, "batch_size": int(options[0])}
    fields["precision"] = precision
    for opt in options[1:]:
        if opt in ("gc", "nogc"):
            fields["grad_ckpt"] = opt == "gc"
        elif opt in COMPILE_MODES:
            fields["compile_mode"] = opt
        elif opt in PRECISIONS:
            fields["precision"] = opt
        elif opt == "nockpt":
            fields["checkpoints"] = False
        elif re.fullmatch(r"(images|epochs)=\d+", opt):
            key, value = opt.split("=")
            fields[key] = int(value)
        else:
            raise ValueError(f"bad option {opt!r} in case {spec!r}")
    return Case(**fields)


def grid_cases(
    batch_sizes: Sequence[int],
    grad_ckpt: Sequence[bool],
    compile_modes: Sequence[str],
    precisions: Sequence[str],
    reference: bool,
) -> list[Case]:
    """Reference cases first (one per batch size and grad-ckpt setting), then ours."""
    cases = []
    if reference:
        cases += [Case("reference", b, g) for b in batch_sizes for g in grad_ckpt]
    for b in batch_sizes:
        for g in grad_ckpt:
            for mode in compile_modes:
                cases += [Case("ours", b, g, mode, p) for p in precisions]
    return cases


# --------------------------------------------------------------------------------- environment
def cuda_sync() -> None:
    """Wait for the device (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _gib(n: float | int | None) -> float | None:
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


def build_model_folder(dest: Path, tiny: bool, dtype: torch.dtype, device: str) -> Path:
    """Save a random-weight model with the reference's SD1.5 (or tiny) shapes as a folder.

    Args:
        dest: Folder to create (kept and reused when it already holds a model).
        tiny: Use the reference's ``TINY_*`` configs instead of SD1.5's.
        dtype: Dtype the weights are saved in (the bench loads them in this dtype).
        device: Where the random initialisation runs (a GPU initialises SD1.5 in seconds).

    Returns:
        ``dest``, loadable with :func:`lightning_lora.models.load_components`.
    """
    from lightning_lora.models import build_model_folder as build

    if (dest / "model_index.json").exists():
        return dest
    ref = load_reference()
    try:
        return build(
            dest,
            unet=ref.TINY_UNET if tiny else ref.UNET,
            vae=ref.TINY_VAE if tiny else ref.VAE,
            text_encoder=ref.TINY_CLIP if tiny else ref.CLIP,
            dtype=dtype,
            device=device,
        )
    finally:
        free_memory()


def make_images(dest: Path, count: int, resolution: int) -> list[Path]:
    """Random-noise JPEG images ``img_0000.jpg ...`` of ``resolution`` pixels (made when missing).

    Args:
        dest: Folder to fill.
        count: Number of images.
        resolution: Side length in pixels.

    Returns:
        The ``count`` image paths (image ``i`` is the same whenever it is made).
    """
    import numpy as np
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    paths = [dest / f"img_{i:04d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            rng = np.random.default_rng(i)
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
    return paths


# --------------------------------------------------------------------------------- callbacks
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


# --------------------------------------------------------------------------------- the runner
@dataclasses.dataclass
class Bench:
    """Shared state of one benchmark run.

    Attributes:
        device: ``cuda`` or ``cpu``.
        tiny: Tiny model shapes instead of SD1.5's.
        resolution: Image side in pixels.
        steps: Timed steps per case.
        warmup: Warm-up steps per case.
        audit_steps: Sync-audit steps after each of our cases (CUDA only).
        steps_per_epoch: Our cases use ``batch_size * steps_per_epoch`` images.
        workdir: Scratch folder (images, runs, and the model unless ``model_dir`` is given).
        model_dir: The random-weight model folder (built on first use).
        extra_overrides: Hydra overrides added to every run of ours.
    """

    device: str
    tiny: bool
    resolution: int
    steps: int
    warmup: int
    audit_steps: int
    steps_per_epoch: int
    workdir: Path
    model_dir: Path | None = None
    extra_overrides: tuple[str, ...] = ()
    attention: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        """Whether the bench runs on a GPU."""
        return self.device == "cuda"

    def model(self) -> Path:
        """The random-weight model folder (SD1.5 saved in bf16, tiny in fp32; built once).

        ``load_components`` casts the weights to the dtype the run's precision asks for.
        """
        if self.model_dir is None:
            from lightning_lora.models import default_cache_dir

            shape = "tiny" if self.tiny else "sd15"
            self.model_dir = default_cache_dir() / f"bench-{shape}-random-{MODEL_FOLDER_VERSION}"
        self.model_dir.parent.mkdir(parents=True, exist_ok=True)
        dtype = torch.float32 if self.tiny else torch.bfloat16
        return build_model_folder(self.model_dir, self.tiny, dtype, self.device)

    def images(self, count: int) -> Path:
        """A folder of ``count`` images (links into one pool of generated images)."""
        pool = make_images(self.workdir / f"pool-{self.resolution}", count, self.resolution)
        folder = self.workdir / f"images-{self.resolution}-{count}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for path in pool:
                (folder / path.name).symlink_to(path.resolve())
        return folder

    def overrides(self, case: Case, image_dir: Path) -> list[str]:
        """The Hydra overrides of one of our runs."""
        fused = self.cuda and case.precision != "16-mixed"  # Lightning: no clipping + fused + fp16
        return [
            f"trainer={'gpu' if self.cuda else 'cpu'}",
            f"model.pretrained_model_name_or_path={self.model()}",
            f"data.image_dir={image_dir}",
            f"data.resolution={self.resolution}",
            f"data.batch_size={case.batch_size}",
            f"trainer.precision={case.precision}",
            "trainer.devices=1",
            "trainer.enable_progress_bar=false",
            f"module.gradient_checkpointing={str(case.grad_ckpt).lower()}",
            f"module.compile_mode={case.compile_mode}",
            f"module.channels_last={str(self.cuda).lower()}",
            f"module.optimizer.fused={'true' if fused else 'null'}",
            "seed=0",
            *self.extra_overrides,
        ]

    # ------------------------------------------------------------------ reference
    def run_reference(self, case: Case) -> dict[str, Any]:
        """Time the reference recipe."""
        ref = load_reference()
        free_memory()
        out = ref.reference_samples_per_s(
            batch_size=case.batch_size,
            resolution=self.resolution,
            grad_ckpt=case.grad_ckpt,
            steps=self.steps,
            warmup=self.warmup,
            tiny=self.tiny,
            device=self.device,
        )
        free_memory()
        return {
            "step_s": float(out["step_s"]),
            "samples_per_s": float(out["samples_per_s"]),
            "peak_gib": out.get("peak_gib"),
            "precision": "16-mixed (GradScaler)" if self.cuda else "bf16-mixed",
            "timed": f"{self.steps} steps of the reference's step() after {self.warmup} warm-up",
        }

    # ------------------------------------------------------------------ ours
    def run_ours(self, case: Case) -> dict[str, Any]:
        """Time steps of a real ``train(cfg)`` run."""
        from lightning_lora.train import compose_config, train

        images = self.images(case.batch_size * self.steps_per_epoch)
        audit = self.audit_steps if self.cuda else 0
        total = self.warmup + self.steps + audit
        overrides = [
            *self.overrides(case, images),
            f"++trainer.max_steps={total}",
            "trainer.max_epochs=1000000",
            "validation.every_n_epochs=1000000",
            *NO_CHECKPOINTS,
        ]
        run_dir = self.workdir / "runs" / re.sub(r"[^A-Za-z0-9_.-]", "_", case.label)
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = compose_config(overrides, output_dir=run_dir)
        timer = StepTimer(self.warmup, self.steps, audit)
        free_memory()
        before = dynamo_counts()
        start = time.perf_counter()
        try:
            result = train(cfg, callbacks=[timer])
        finally:
            if timer.unet is not None:
                self.attention = attention_processors(timer.unet)
        wall = time.perf_counter() - start
        after = dynamo_counts()
        step_s = timer.step_s
        fit_start = timer.fit_start or start
        first = timer.first_batch or fit_start
        assert timer.window_start is not None
        row = {
            "step_s": step_s,
            "samples_per_s": case.batch_size / step_s,
            "peak_gib": _gib(timer.peak_window),
            "peak_prepare_gib": _gib(timer.peak_prepare),
            "prepare_s": first - fit_start,
            "warmup_s": timer.window_start - first,
            "run_wall_s": wall,
            "graphs_compiled": after.get("unique_graphs", 0) - before.get("unique_graphs", 0),
            "steps_run": int(result.metrics.get("steps", 0)),
            "timed": (
                f"{self.steps} Lightning training steps (fit loop, training_step, backward, "
                f"clip, optimizer, logging, callbacks) after {self.warmup} warm-up steps"
            ),
        }
        if audit:
            row["sync_audit_steps"] = audit
            row["syncs_per_step"] = len(timer.syncs) / audit
            row["sync_sites"] = dict(Counter(timer.syncs).most_common(8))
        return row

    # ------------------------------------------------------------------ a whole job
    def run_job(self, case: Case) -> dict[str, Any]:
        """Run a whole job as a warm worker would and split its wall time into phases."""
        from lightning_lora.train import compose_config, train

        images = self.images(case.images)
        overrides = [*self.overrides(case, images), f"trainer.max_epochs={case.epochs}"]
        if not case.checkpoints:
            overrides += NO_CHECKPOINTS
        run_dir = self.workdir / "runs" / re.sub(r"[^A-Za-z0-9_.-]", "_", case.label)
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = compose_config(overrides, output_dir=run_dir)
        phases = PhaseTimer()
        free_memory()
        before = dynamo_counts()
        result = train(cfg, callbacks=[phases])
        end = time.perf_counter()
        after = dynamo_counts()
        split = phases.phases(end)
        steps = int(result.metrics.get("steps", 0))
        samples = float(result.metrics.get("samples", 0.0))
        train_s = float(result.metrics.get("train_seconds", split["training_s"]))
        return {
            "step_s": split["training_s"] / steps if steps else None,
            "samples_per_s": samples / train_s if train_s else None,
            "job_wall_s": end - phases.marks["start"],
            "train_seconds": train_s,
            "phases": split,
            "steps_run": steps,
            "epochs": case.epochs,
            "images": case.images,
            "checkpoints_saved": phases.checkpoints,
            "graphs_compiled": after.get("unique_graphs", 0) - before.get("unique_graphs", 0),
            "val_loss": result.metrics.get("val/loss"),
            "timed": (
                "train(cfg) end to end; train_seconds = ThroughputCallback (first epoch start "
                "to last epoch end, validation every 10 epochs and checkpoints included)"
            ),
        }


def estimate_s(case: Case, done: Sequence[dict[str, Any]], bench: Bench) -> float:
    """A rough duration of a case, for ``--budget-s`` (compilation dominates on a GPU)."""
    compile_s = 200.0 if bench.cuda and not bench.tiny else 60.0
    if case.recipe == "reference":
        return 30.0
    if case.recipe == "ours":
        return 30.0 + (compile_s if case.compile_mode != "none" else 0.0)
    measured = [
        r["step_s"]
        for r in done
        if r.get("recipe") == "ours"
        and r.get("step_s")
        and (r["batch_size"], r["compile_mode"]) == (case.batch_size, case.compile_mode)
    ]
    steps = math.ceil(case.images / case.batch_size) * case.epochs
    compiled_before = bool(measured) or case.compile_mode == "none"
    per_step = measured[0] if measured else 0.2
    return 30.0 + 1.5 * steps * per_step + (0.0 if compiled_before else compile_s)


def attach_ratios(rows: list[dict[str, Any]]) -> None:
    """Give each of our rows the ratio of its samples/s to the matching reference row.

    The match is the reference row with the same batch size and gradient checkpointing, else
    the same batch size; ``ratio = ours.samples_per_s / reference.samples_per_s``.
    """
    refs = [r for r in rows if r.get("recipe") == "reference" and r.get("samples_per_s")]
    for row in rows:
        if row.get("recipe") != "ours" or not row.get("samples_per_s"):
            continue
        same_batch = [r for r in refs if r["batch_size"] == row["batch_size"]]
        exact = [r for r in same_batch if r["grad_ckpt"] == row["grad_ckpt"]]
        match = (exact or same_batch or [None])[0]
        if match is None:
            row.update(reference_case=None, reference_samples_per_s=None, ratio_to_reference=None)
            continue
        row["reference_case"] = match["case"]
        row["reference_samples_per_s"] = match["samples_per_s"]
        row["ratio_to_reference"] = row["samples_per_s"] / match["samples_per_s"]


def attach_mfu(rows: list[dict[str, Any]], flops: float | None, peak_tflops: float | None) -> None:
    """Model FLOPs utilisation: ``flops_per_sample * samples_per_s / peak``."""
    for row in rows:
        sps = row.get("samples_per_s")
        row["tflop_per_sample"] = flops / 1e12 if flops else None
        row["achieved_tflops"] = flops * sps / 1e12 if flops and sps else None
        row["mfu"] = (
            row["achieved_tflops"] / peak_tflops if row["achieved_tflops"] and peak_tflops else None
        )


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec)


TABLE_COLUMNS = (
    "case",
    "batch",
    "grad ckpt",
    "compile",
    "precision",
    "s/step",
    "samples/s",
    "peak GiB",
    "MFU",
    "vs reference",
    "syncs/step",
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the results (skipped and failed cases say why)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        if r.get("error") or r.get("skipped"):
            note = " ".join(str(r.get("skipped") or f"error: {r.get('error')}").split())
            cells = [r["case"], str(r["batch_size"]), *["-"] * 8, note[:80]]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        ratio = r.get("ratio_to_reference")
        cells = [
            r["case"],
            str(r["batch_size"]),
            "on" if r["grad_ckpt"] else "off",
            r.get("compile_mode") or "-",
            r.get("precision") or "-",
            _fmt(r.get("step_s"), ".4f"),
            _fmt(r.get("samples_per_s"), ".1f"),
            _fmt(r.get("peak_gib"), ".2f"),
            _fmt(r.get("mfu") and 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") else ""),
            _fmt(ratio, ".2f") + ("x" if ratio else ""),
            _fmt(r.get("syncs_per_step"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_jobs(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the job rows' phases."""
    jobs = [r for r in rows if r.get("recipe") == "job" and r.get("phases")]
    if not jobs:
        return ""
    keys = list(jobs[0]["phases"])
    head = ["job", "steps", "train_seconds", "samples/s", "graphs compiled", "ckpts", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in jobs:
        cells = [
            r["case"],
            str(r["steps_run"]),
            _fmt(r.get("train_seconds"), ".2f"),
            _fmt(r.get("samples_per_s"), ".1f"),
            str(r.get("graphs_compiled")),
            str(r.get("checkpoints_saved")),
            *[_fmt(r["phases"][k], ".2f") for k in keys],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- end to end
class _LocalStorage:
    """The bucket as a local folder (the e2e job's storage: transfers are file copies).

    Implements the part of :class:`~lightning_lora.clients.storage.S3Storage` the worker uses.
    """

    bucket = "bench"

    def __init__(self, root: Path, images: Sequence[Path]) -> None:
        self.root = root
        self.images = {f"s3://{self.bucket}/style/{p.name}": p for p in images}
        self.download_s = 0.0
        root.mkdir(parents=True, exist_ok=True)

    def s3_url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def download_images(self, urls: Sequence[str], dest_dir: Any, **_: Any) -> list[Path]:
        start = time.perf_counter()
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        paths = [
            Path(shutil.copy(self.images[url], dest / f"{i:04d}.jpg")) for i, url in enumerate(urls)
        ]
        self.download_s += time.perf_counter() - start
        return paths

    def upload_file(self, path: Any, key: str, extra_metadata: Any = None) -> str:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return self.s3_url(key)

    def download_file(self, key: str, dest: Any) -> Path:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(self.root / key, dest))

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def list_keys(self, prefix: str, page_size: int = 1000) -> list[str]:
        return sorted(
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.is_file() and str(p.relative_to(self.root)).startswith(prefix)
        )

    def delete_keys(self, keys: Any) -> int:
        count = 0
        for key in keys:
            (self.root / key).unlink(missing_ok=True)
            count += 1
        return count

    # single process: the conditional writes of the worker's ledger need no locking here
    def get_json(self, key: str) -> tuple[dict[str, Any], str] | None:
        path = self.root / key
        if not path.is_file():
            return None
        raw = path.read_bytes()
        return json.loads(raw), hashlib.md5(raw).hexdigest()

    def put_json(
        self, key: str, record: Any, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        from lightning_lora.errors import PreconditionFailedError

        current = self.get_json(key)
        if (if_none_match and current is not None) or (
            if_match is not None and (current is None or current[1] != if_match)
        ):
            raise PreconditionFailedError(f"{key} was written by someone else")
        raw = json.dumps(dict(record), sort_keys=True).encode()
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        return hashlib.md5(raw).hexdigest()

    def delete_key(self, key: str, *, if_match: str | None = None) -> bool:
        current = self.get_json(key)
        if if_match is not None and current is not None and current[1] != if_match:
            return False
        (self.root / key).unlink(missing_ok=True)
        return True


class _WebhookReceiver:
    """A local HTTP server that answers 200 and records when each webhook arrived."""

    def __init__(self) -> None:
        import http.server
        import threading

        received: list[tuple[float, str, Any]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body or b"null")
                except ValueError:
                    payload = None
                received.append((time.perf_counter(), self.path, payload))
                reply = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_PATCH = do_PUT = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _TimingsLog(logging.Handler):
    """Keeps the worker's ``job ... timings: k=v ...`` line."""

    def __init__(self) -> None:
        super().__init__()
        self.timings: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " timings: " in message:
            pairs = message.split(" timings: ", 1)[1].split()
            self.timings = {k: float(v) for k, v in (p.split("=", 1) for p in pairs)}


def run_e2e(bench: Bench, epochs: int = 10, images: int = 8) -> dict[str, Any]:
    """A tiny-model job through the queue worker, message to completion webhook, in phases.

    The worker's :meth:`~lightning_lora.worker.app.TrainingWorker.handle` gets a delivery built
    from a job message (no broker: queue wait is not part of it); the images come from, and the
    checkpoints and LoRA go to, a local folder standing in for S3; the webhooks go to a local
    HTTP server, which records when each arrived. Skipped while the worker is not importable.

    Args:
        bench: The benchmark (device, scratch folder).
        epochs: The job's ``num_epochs``.
        images: Training images in the job.

    Returns:
        Phase seconds (the worker's own timing line plus ``message_to_complete_webhook_s``),
        the outcome and the webhooks received; or ``{"skipped": reason}``.
    """
    try:
        import threading
        import types

        from lightning_lora.worker.app import TrainingWorker, split_config
        from lightning_lora.worker.cli import compose_worker_config
        from lightning_lora.worker.consumer import Delivery
        from lightning_lora.worker.settings import load_settings
    except Exception as exc:  # the worker (or pika/pydantic) is optional here
        return {"skipped": f"the worker is not importable: {exc!r}"}
    root = bench.workdir / "e2e"
    shutil.rmtree(root, ignore_errors=True)
    storage = _LocalStorage(root / "bucket", make_images(root / "source", images, 64))
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    receiver = _WebhookReceiver()
    timings = _TimingsLog()
    app_log = logging.getLogger("lightning_lora.worker.app")
    app_log.addHandler(timings)
    try:
        train_cfg, section = split_config(
            compose_worker_config(
                [
                    "model=tiny",
                    f"trainer={'gpu' if bench.cuda else 'cpu'}",
                    "trainer.enable_progress_bar=false",
                    "data.batch_size=4",
                ]
            )
        )
        settings = load_settings(
            {
                **section,
                "webhook_allowlist": [receiver.base_url],
                "work_dir": str(root / "jobs"),
                "resume_from_s3": False,
            },
            env={"INTERNAL_API_TOKEN": "bench-token", "S3_BUCKET": "bench-bucket"},
        )
        worker = TrainingWorker(train_cfg, settings, storage=storage)
        message = {
            "style_id": 4242,
            "image_urls": sorted(storage.images),
            "webhook_url": receiver.base_url,
            "num_epochs": epochs,
            "resolution": 64,
        }
        delivery = Delivery(
            body=json.dumps(message).encode(),
            properties=types.SimpleNamespace(message_id="bench-e2e"),
            headers={},
            delivery_tag=1,
            redelivered=False,
            delivery_count=0,
            published_at=None,
            stop_requested=threading.Event(),
        )
        start = time.perf_counter()
        outcome = worker.handle(delivery)
        total = time.perf_counter() - start
    finally:
        app_log.removeHandler(timings)
        receiver.close()
    complete = [t for t, path, _ in receiver.received if path.endswith("/complete")]
    phases = dict(timings.timings)
    if phases:
        known = sum(phases.get(k, 0.0) for k in ("download_s", "training_s", "upload_and_report_s"))
        phases["setup_and_config_s"] = max(0.0, phases.get("total_s", total) - known)
    return {
        "outcome": outcome.outcome.name if hasattr(outcome, "outcome") else str(outcome),
        "device": bench.device,
        "images": images,
        "epochs": epochs,
        "resolution": 64,
        "worker_timings": phases,
        "handle_s": total,
        "message_to_complete_webhook_s": complete[0] - start if complete else None,
        "webhooks": dict(Counter(path for _, path, _ in receiver.received)),
        "storage": "local folder standing in for S3; webhooks to a local HTTP server",
    }


# --------------------------------------------------------------------------------- main
def _reference_flops(bench: Bench, flops_device: str) -> float | None:
    try:
        ref = load_reference()
        counted = ref.unet_train_flops(bench.resolution, tiny=bench.tiny, device=flops_device)
    except Exception as exc:  # FLOPs are a nice-to-have; the timings stand without them
        log.warning("FLOP count failed: %r", exc)
        return None
    finally:
        free_memory()
    return float(counted["forward"] + counted["backward"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed CLI arguments and return the JSON document."""
    from lightning_lora.train import package_versions

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    tiny = args.tiny or (device == "cpu" and not args.full)
    resolution = args.resolution or (512 if not tiny else 64)
    precisions = args.precision or (["bf16-mixed"] if device == "cuda" else ["32-true"])
    if args.e2e_only:
        cases: list[Case] = []
        args.e2e, args.no_flops = True, True
    elif args.case:
        cases = [parse_case(spec, precisions[0]) for spec in args.case]
    else:
        cases = grid_cases(
            args.batch_sizes or ([4, 16] if device == "cuda" else [2]),
            [{"on": True, "off": False}[g] for g in args.grad_ckpt],
            args.compile,
            precisions,
            not args.no_reference,
        )
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ll-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        device=device,
        tiny=tiny,
        resolution=resolution,
        steps=args.steps,
        warmup=args.warmup,
        audit_steps=args.audit_steps,
        steps_per_epoch=args.steps_per_epoch,
        workdir=workdir,
        model_dir=Path(args.model_dir) if args.model_dir else None,
        extra_overrides=tuple(args.override),
    )
    peak = args.peak_tflops
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    if peak is None and device == "cuda":
        peak = next((v for k, v in MEASURED_PEAK_TFLOPS.items() if k in name), None)
    ref_file = reference_path()
    doc: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "device": device,
            "device_name": name,
            "model": "tiny (reference TINY_* configs)" if tiny else "SD1.5 shapes",
            "resolution": resolution,
            "steps": bench.steps,
            "warmup": bench.warmup,
            "peak_tflops": peak,
            "versions": package_versions(),
            "reference": str(ref_file),
            "reference_sha256": hashlib.sha256(ref_file.read_bytes()).hexdigest(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        },
        "results": [],
    }
    if device == "cuda":
        doc["meta"]["sdpa_backends"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    started = time.perf_counter()
    flops = args.flops_per_sample
    if flops is None and not args.no_flops:
        flops = _reference_flops(bench, device)
    doc["meta"]["flops_per_sample"] = flops
    rows: list[dict[str, Any]] = doc["results"]

    def save() -> None:
        attach_ratios(rows)
        attach_mfu(rows, flops, peak)
        doc["meta"]["attention_processors"] = bench.attention
        doc["meta"]["elapsed_s"] = time.perf_counter() - started
        doc["table"] = format_table(rows)
        doc["jobs_table"] = format_jobs(rows)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
        if args.table:
            text = doc["table"] + ("\n\n" + doc["jobs_table"] if doc["jobs_table"] else "")
            Path(args.table).write_text(text + "\n", encoding="utf-8")

    for case in cases:
        row: dict[str, Any] = {
            "case": case.label,
            "recipe": case.recipe,
            "batch_size": case.batch_size,
            "grad_ckpt": case.grad_ckpt,
            "compile_mode": None if case.recipe == "reference" else case.compile_mode,
            "precision": None if case.recipe == "reference" else case.precision,
        }
        elapsed = time.perf_counter() - started
        need = estimate_s(case, rows, bench)
        if args.budget_s and elapsed + need > args.budget_s:
            row["skipped"] = f"time budget: {elapsed:.0f}s used, ~{need:.0f}s needed"
            log.warning("skipping %s (%s)", case.label, row["skipped"])
            rows.append(row)
            save()
            continue
        if case.compile_mode != "none" and args.reset_compile and case.recipe == "ours":
            torch._dynamo.reset()  # a clean compile per compiled case (see --reuse-compile)
        print(f"[bench] {case.label} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            runner = {
                "reference": bench.run_reference,
                "ours": bench.run_ours,
                "job": bench.run_job,
            }
            row.update(runner[case.recipe](case))
        except Exception as exc:
            log.exception("case %s failed", case.label)
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            if args.fail_fast:
                raise
        row["case_wall_s"] = time.perf_counter() - t0
        row["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        rows.append(row)
        print(f"[bench] {case.label}: {_summary(row)}", file=sys.stderr, flush=True)
        save()

    if args.e2e:
        doc["e2e"] = run_e2e(bench, epochs=args.e2e_epochs)
    save()
    if not args.keep_workdir and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return doc


def _summary(row: dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    sps, step = row.get("samples_per_s"), row.get("step_s")
    return f"{_fmt(sps, '.2f')} samples/s, {_fmt(step, '.4f')} s/step, {row['case_wall_s']:.1f}s"


def build_parser() -> argparse.ArgumentParser:
    """The CLI of ``lightning-lora-bench``."""
    p = argparse.ArgumentParser(
        prog="lightning-lora-bench",
        description="Time the project's LoRA training step against the diffusers reference.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    p.add_argument("--case", action="append", default=[], help="a case spec (repeatable)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="grid: batch sizes")
    p.add_argument("--grad-ckpt", nargs="+", default=["off"], choices=["on", "off"])
    p.add_argument("--compile", nargs="+", default=["none"], choices=COMPILE_MODES)
    p.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        help="precisions of ours (default: bf16-mixed on CUDA, 32-true on CPU)",
    )
    p.add_argument("--no-reference", action="store_true", help="grid: skip the reference")
    p.add_argument("--tiny", action="store_true", help="tiny model shapes (default on CPU)")
    p.add_argument("--full", action="store_true", help="SD1.5 shapes even on CPU")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    p.add_argument("--resolution", type=int, help="pixels (default 512, tiny 64)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps per case")
    p.add_argument("--audit-steps", type=int, default=5, help="sync-audit steps (CUDA)")
    p.add_argument("--steps-per-epoch", type=int, default=5, help="images = batch * this")
    p.add_argument("--peak-tflops", type=float, help="device matrix rate for MFU")
    p.add_argument("--flops-per-sample", type=float, help="skip the FLOP count, use this")
    p.add_argument("--no-flops", action="store_true", help="no FLOP count (no MFU)")
    p.add_argument("--budget-s", type=float, help="skip cases that would not fit this time")
    p.add_argument(
        "--reuse-compile",
        dest="reset_compile",
        action="store_false",
        help="keep dynamo's caches between compiled cases (default: reset before each)",
    )
    p.add_argument("--override", action="append", default=[], help="extra Hydra override")
    p.add_argument("--e2e", action="store_true", help="also a job through the queue worker")
    p.add_argument("--e2e-only", action="store_true", help="only the job through the worker")
    p.add_argument("--e2e-epochs", type=int, default=10, help="epochs of the e2e job")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--table", help="write the markdown table here")
    p.add_argument("--workdir", help="scratch folder (kept); default: a temporary one")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--model-dir", help="random-weight model folder (built when missing)")
    p.add_argument("--fail-fast", action="store_true", help="raise on the first failed case")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-lora-bench``: run, print the table, write ``--json``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning.pytorch", "lightning.fabric", "lightning_lora.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(eval mode|does not have many workers).*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    doc = run(args)
    print(doc["table"])
    if doc.get("jobs_table"):
        print()
        print(doc["jobs_table"])
    if "e2e" in doc:
        print(f"\ne2e: {json.dumps(doc['e2e'], default=str)}")
    failed = [r for r in doc["results"] if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
