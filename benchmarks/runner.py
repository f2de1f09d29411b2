"""The runner: one benchmark run's shared state, one method per recipe, and the run loop.

All cases run in one process on one device, after warm-up:

* **baseline**: :class:`benchmarks.baseline.DiffusersLoRAStep`, the project's implementation of
  the training step of diffusers' ``train_text_to_image_lora.py`` (VAE and text encoder every
  step, fp16 with a GradScaler, AdamW over the LoRA parameters), on a private copy of the model.
* **reference**: the shared ``sd15_lora_reference.py`` when it is found (a cross-check column of
  the baseline; skipped in a clone without it).
* **ours**: a real ``lightning_lora.training.run.train(cfg)`` run (Hydra config, ``Trainer.fit``,
  ``LoRAModule.training_step``, Lightning's optimizer step with gradient clipping, logging and
  callbacks) over cached latents of a synthetic image folder. A callback synchronises the device
  and reads the clock at the start of step ``warmup + 1`` and at the end of step
  ``warmup + steps``: everything Lightning does in between is timed. Per-epoch checkpoints and
  validation are off for these cases (they are measured by ``job``).
* **job**: a whole training job as a warm worker runs it (``train(cfg)`` with the default
  callbacks), split into phases. Run after an ``ours`` case with the same settings, it shows
  whether a new job (a new LoRA) reuses the compiled UNet (``graphs_compiled``).

A compiled ``ours`` case gets a fresh compile cache folder (``module.compile_cache_dir``) and a
``torch._dynamo.reset()``, so its ``compile_s`` is a cold compile; ``--compile-cache-dir`` shares
one folder instead (a second run then measures the warm cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks import baseline, models, report
from benchmarks.cases import REFERENCE_PRECISION, Case, effective_precision, grid_cases, parse_case
from benchmarks.e2e import run_e2e
from benchmarks.timers import (
    PhaseTimer,
    StepTimer,
    attention_processors,
    dynamo_counts,
    free_memory,
    gib,
)

log = logging.getLogger(__name__)

#: Dense bf16 matrix rate (TFLOP/s) measured on this project's lent H200 machines (an 8192^3
#: bf16 matmul on random data); the datasheet says about 990.
MEASURED_PEAK_TFLOPS = {"H200": 790.0}
#: No per-epoch checkpoints (without a ModelCheckpoint, Lightning would add its own).
NO_CHECKPOINTS = ("~callbacks.model_checkpoint", "++trainer.enable_checkpointing=false")

# the recipe's LoRA in our runs: rank and alpha as baseline.RecipeSettings, and no dropout (the
# recipe's LoraConfig has none; the project's 0.1 costs a mask per LoRA input), so that a pair
# differs in the trainer alone
RECIPE_LORA = (
    f"lora.rank={baseline.RecipeSettings.rank}",
    f"lora.alpha={baseline.RecipeSettings.alpha}",
    "lora.dropout=0",
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


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
        compile_cache_dir: One compile cache folder for every compiled case (default: a fresh
            folder per case, i.e. cold compiles).
        attention: The UNet's attention processor classes (filled by the first run of ours).
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
    compile_cache_dir: Path | None = None
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
            self.model_dir = models.default_model_dir(self.tiny)
        self.model_dir.parent.mkdir(parents=True, exist_ok=True)
        dtype = torch.float32 if self.tiny else torch.bfloat16
        return models.build_model_folder(self.model_dir, self.tiny, dtype, self.device)

    def images(self, count: int) -> Path:
        """A folder of ``count`` images (links into one pool of generated images)."""
        pool = models.make_images(self.workdir / f"pool-{self.resolution}", count, self.resolution)
        folder = self.workdir / f"images-{self.resolution}-{count}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for path in pool:
                (folder / path.name).symlink_to(path.resolve())
        return folder

    def compile_dir(self, case: Case) -> Path:
        """The compile cache folder of a compiled case (fresh unless one is shared)."""
        if self.compile_cache_dir is not None:
            return self.compile_cache_dir
        folder = self.workdir / "compile-cache" / _slug(case.label)
        shutil.rmtree(folder, ignore_errors=True)
        return folder

    def overrides(self, case: Case, image_dir: Path) -> list[str]:
        """The Hydra overrides of one of our runs."""
        fused = self.cuda and case.precision != "16-mixed"  # Lightning: no clipping + fused + fp16
        out = [
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
            *RECIPE_LORA,
            "seed=0",
        ]
        if case.compile_mode != "none":
            out.append(f"module.compile_cache_dir={self.compile_dir(case)}")
        if case.extra_blocks:
            out.append(f"module.compile_extra_blocks=[{','.join(case.extra_blocks)}]")
        return [*out, *self.extra_overrides]

    # ------------------------------------------------------------------ the baselines
    def run_baseline(self, case: Case) -> dict[str, Any]:
        """Time the project's implementation of diffusers' recipe."""
        out = baseline.time_baseline(
            self.model(),
            batch_size=case.batch_size,
            resolution=self.resolution,
            grad_ckpt=case.grad_ckpt,
            steps=self.steps,
            warmup=self.warmup,
            device=self.device,
            settings=baseline.RecipeSettings(
                mixed_precision=baseline.recipe_precision(case.precision, self.device)
            ),
        )
        losses = out.pop("losses")
        return {
            **out,
            "final_loss": losses[-1] if losses else None,
            "timed": (
                f"{self.steps} steps of benchmarks.baseline.DiffusersLoRAStep after "
                f"{self.warmup} warm-up"
            ),
        }

    def run_reference(self, case: Case) -> dict[str, Any]:
        """Time the shared reference recipe (skipped where the file is absent)."""
        if baseline.reference_path() is None:
            places = ", ".join(map(str, baseline.reference_candidates()))
            return {"skipped": f"no {baseline.REFERENCE_FILE} ({places})"}
        out = baseline.time_reference(
            batch_size=case.batch_size,
            resolution=self.resolution,
            grad_ckpt=case.grad_ckpt,
            steps=self.steps,
            warmup=self.warmup,
            tiny=self.tiny,
            device=self.device,
        )
        timed = f"{self.steps} steps of the reference's step() after {self.warmup} warm-up"
        return {**out, "timed": timed}

    # ------------------------------------------------------------------ ours
    def run_ours(self, case: Case) -> dict[str, Any]:
        """Time steps of a real ``train(cfg)`` run."""
        from lightning_lora.config import compose_config
        from lightning_lora.training.run import train

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
        run_dir = self.workdir / "runs" / _slug(case.label)
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
        warmup_s = timer.window_start - first
        row = {
            "step_s": step_s,
            "samples_per_s": case.batch_size / step_s,
            "peak_gib": gib(timer.peak_window),
            "peak_prepare_gib": gib(timer.peak_prepare),
            "prepare_s": first - fit_start,
            "warmup_s": warmup_s,
            "compile_s": max(0.0, warmup_s - self.warmup * step_s),
            "run_wall_s": wall,
            "graphs_compiled": after.get("unique_graphs", 0) - before.get("unique_graphs", 0),
            "steps_run": int(result.metrics.get("steps", 0)),
            "timed": (
                f"{self.steps} Lightning training steps (fit loop, training_step, backward, "
                f"clip, optimizer, logging, callbacks) after {self.warmup} warm-up steps; "
                "compile_s = warm-up time beyond that many steady steps"
            ),
        }
        if case.compile_mode != "none":
            row["compile_cache_dir"] = str(cfg.module.compile_cache_dir)
        if audit:
            row["sync_audit_steps"] = audit
            row["syncs_per_step"] = len(timer.syncs) / audit
            row["sync_sites"] = dict(Counter(timer.syncs).most_common(8))
        return row

    # ------------------------------------------------------------------ a whole job
    def run_job(self, case: Case) -> dict[str, Any]:
        """Run a whole job as a warm worker would and split its wall time into phases."""
        from lightning_lora.config import compose_config
        from lightning_lora.training.run import train

        images = self.images(case.images)
        overrides = [*self.overrides(case, images), f"trainer.max_epochs={case.epochs}"]
        if not case.checkpoints:
            overrides += NO_CHECKPOINTS
        run_dir = self.workdir / "runs" / _slug(case.label)
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

    def run_case(self, case: Case) -> dict[str, Any]:
        """Run one case with the method of its recipe."""
        runner = {
            "baseline": self.run_baseline,
            "reference": self.run_reference,
            "ours": self.run_ours,
            "job": self.run_job,
        }
        return runner[case.recipe](case)


def estimate_s(case: Case, done: Sequence[dict[str, Any]], bench: Bench) -> float:
    """A rough duration of a case, for ``--budget-s`` (compilation dominates on a GPU)."""
    compile_s = 200.0 if bench.cuda and not bench.tiny else 60.0
    if case.compile_mode == "regional":
        compile_s /= 4
    if case.recipe in ("baseline", "reference"):
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


def _flops(bench: Bench) -> float | None:
    try:
        counted = models.unet_train_flops(models.shapes(bench.tiny)[0], bench.resolution)
    except Exception as exc:  # FLOPs are a nice-to-have; the timings stand without them
        log.warning("FLOP count failed: %r", exc)
        return None
    return float(counted["forward"] + counted["backward"])


def _cases(args: argparse.Namespace, device: str, precisions: list[str]) -> list[Case]:
    if args.e2e_only:
        return []
    if args.case:
        return [parse_case(spec, precisions[0]) for spec in args.case]
    baselines = [] if args.no_baseline else ["baseline"]
    if not args.no_reference and baseline.reference_path() is not None:
        baselines.append("reference")
    # the CPU default is like-for-like pairs: batch 2 and 4, with and without checkpointing
    grad_ckpt = args.grad_ckpt or (["off"] if device == "cuda" else ["off", "on"])
    return grid_cases(
        args.batch_sizes or ([4, 16] if device == "cuda" else [2, 4]),
        [{"on": True, "off": False}[g] for g in grad_ckpt],
        args.compile,
        precisions,
        baselines,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed CLI arguments and return the JSON document."""
    from lightning_lora.training.provenance import package_versions

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    tiny = args.tiny or (device == "cpu" and not args.full)
    resolution = args.resolution or (512 if not tiny else 64)
    precisions = args.precision or (["bf16-mixed"] if device == "cuda" else ["32-true"])
    if args.e2e_only:
        args.e2e, args.no_flops = True, True
    cases = _cases(args, device, precisions)
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
        compile_cache_dir=Path(args.compile_cache_dir) if args.compile_cache_dir else None,
    )
    peak = args.peak_tflops
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    if peak is None and device == "cuda":
        peak = next((v for k, v in MEASURED_PEAK_TFLOPS.items() if k in name), None)
    ref_file = baseline.reference_path()
    doc: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "device": device,
            "device_name": name,
            "model": "tiny (SD1.5 layout, few channels)" if tiny else "SD1.5 shapes",
            "resolution": resolution,
            "steps": bench.steps,
            "warmup": bench.warmup,
            "peak_tflops": peak,
            "versions": package_versions(),
            "baseline": "benchmarks.baseline.DiffusersLoRAStep (train_text_to_image_lora.py)",
            "reference": str(ref_file) if ref_file else None,
            "reference_sha256": (
                hashlib.sha256(ref_file.read_bytes()).hexdigest() if ref_file else None
            ),
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
        flops = _flops(bench)
    doc["meta"]["flops_per_sample"] = flops
    rows: list[dict[str, Any]] = doc["results"]

    def save() -> None:
        report.attach_ratios(rows)
        report.attach_mfu(rows, flops, peak)
        doc["meta"]["attention_processors"] = bench.attention
        doc["meta"]["elapsed_s"] = time.perf_counter() - started
        doc["table"] = report.format_table(rows)
        doc["jobs_table"] = report.format_jobs(rows)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
        if args.table:
            text = doc["table"] + ("\n\n" + doc["jobs_table"] if doc["jobs_table"] else "")
            Path(args.table).write_text(text + "\n", encoding="utf-8")

    def measure(case: Case, run: int) -> dict[str, Any]:
        row: dict[str, Any] = {
            "case": case.label,
            "recipe": case.recipe,
            "batch_size": case.batch_size,
            "grad_ckpt": case.grad_ckpt,
            "compile_mode": None if case.recipe in ("baseline", "reference") else case.compile_mode,
            # as run: the reference has a fixed one, Lightning runs 16-mixed as bf16 on a CPU
            "precision": (
                REFERENCE_PRECISION[device]
                if case.recipe == "reference"
                else effective_precision(case.precision, device)
            ),
        }
        elapsed = time.perf_counter() - started
        need = estimate_s(case, rows, bench)
        if args.budget_s and elapsed + need > args.budget_s:
            row["skipped"] = f"time budget: {elapsed:.0f}s used, ~{need:.0f}s needed"
            log.warning("skipping %s (%s)", case.label, row["skipped"])
            return row
        if case.compile_mode != "none" and args.reset_compile and case.recipe == "ours":
            torch._dynamo.reset()  # a clean compile per compiled case (see --reuse-compile)
        print(f"[bench] {case.label} (run {run}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            row.update(bench.run_case(case))
        except Exception as exc:
            log.exception("case %s failed", case.label)
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            if args.fail_fast:
                raise
        row["case_wall_s"] = time.perf_counter() - t0
        row["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        print(f"[bench] {case.label}: {report.summary(row)}", file=sys.stderr, flush=True)
        return row

    # --repeat N: every case once per round, N rounds (drift of the machine's load falls on all
    # cases alike); each case's row is its median run, with every run's s/step beside it
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(cases))}
    for run in range(1, max(1, args.repeat) + 1):
        for index, case in enumerate(cases):
            runs[index].append(measure(case, run))
            rows[:] = [report.median_run(found) for found in runs.values() if found]
            save()

    if args.e2e:
        doc["e2e"] = run_e2e(bench.workdir, bench.cuda, epochs=args.e2e_epochs)
    save()
    if not args.keep_workdir and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return doc
