"""A reported training: train, upload the LoRA, and tell the backend how it went.

:func:`run_reported_training` is what the queue worker calls for a job; it works without the
queue too::

    with JobReport(webhook_client(job.webhook_url, cfg), job.style_id) as report:
        result = run_reported_training(cfg, report, S3Storage.from_env(), run_id="job-123")

It

1. builds the :class:`~lightning_lora.callbacks.progress.ProgressCallback` (progress) and the
   :class:`~lightning_lora.callbacks.s3_checkpoint.S3CheckpointCallback` (checkpoints under the
   run's prefix, :func:`~lightning_lora.jobs.layout.checkpoint_prefix`) from the partial targets
   of the ``reporting`` config group (``cfg.reporting.webhook``, ``cfg.reporting.s3_checkpoint``);
2. resumes from the run's newest usable checkpoint in S3 when there is one
   (:func:`~lightning_lora.callbacks.s3_checkpoint.find_resume_checkpoint`);
3. runs :func:`lightning_lora.training.run.train`, unless ``finished`` already holds this run's
   exported LoRA (a job requeued after the upload could not reach S3 keeps it);
4. uploads the diffusers LoRA to ``models/style_{id}/lora_weights.safetensors`` and the kohya
   file to ``models/style_{id}/lora_kohya.safetensors`` (:func:`upload_final_lora`), the final
   sample grid to ``models/style_{id}/samples.png`` when the run drew one (:func:`upload_samples`:
   best effort, a failure is a warning) and the model card to ``models/style_{id}/README.md``
   (:func:`upload_model_card`);
5. reports the completion through the job's :class:`~lightning_lora.jobs.report.JobReport`
   with metadata from the run's config and counters (:func:`completion_metadata`).

An exception anywhere (in ``fit``, in the export, in the upload) goes to
:meth:`JobReport.fail <lightning_lora.jobs.report.JobReport.fail>`, which applies the one rule
(:func:`~lightning_lora.errors.disposition_of`): a failure is reported once, a shutdown or S3
being down reports nothing. The exception is then re-raised, so the caller settles the job by
the same rule.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from lightning_lora.callbacks.progress import ProgressCallback
from lightning_lora.callbacks.s3_checkpoint import S3CheckpointCallback, find_resume_checkpoint
from lightning_lora.clients.storage import S3Storage
from lightning_lora.config import partial_at
from lightning_lora.errors import StorageUnavailableError, UploadError
from lightning_lora.jobs.layout import (
    checkpoint_prefix,
    kohya_key,
    model_card_key,
    model_key,
    samples_key,
)
from lightning_lora.jobs.report import JobReport
from lightning_lora.lora.export import LoraFiles
from lightning_lora.lora.model_card import SAMPLES_NAME, render_model_card, write_model_card
from lightning_lora.training.run import TrainResult, train
from lightning_lora.version import __version__

__all__ = [
    "FINISHED_MARKER",
    "completion_metadata",
    "report_completion",
    "run_reported_training",
    "upload_final_lora",
    "upload_model_card",
    "upload_samples",
]

log = logging.getLogger(__name__)


def upload_final_lora(
    storage: S3Storage, style_id: int, result: TrainResult
) -> tuple[str, str | None]:
    """Upload the exported LoRA files to their final keys.

    Args:
        storage: The bucket.
        style_id: The style trained.
        result: The finished run (``result.lora`` must be set: rank zero).

    Returns:
        ``(model_url, kohya_url)``: the ``s3://`` URLs of ``models/style_{id}/
        lora_weights.safetensors`` (diffusers format, the contract's file) and
        ``.../lora_kohya.safetensors``; ``kohya_url`` is ``None`` for a DoRA LoRA, which the
        kohya format cannot carry (:data:`~lightning_lora.lora.kohya.DORA_NOT_IN_KOHYA`): then an
        older kohya file of the style is deleted, so no stale file stands beside the new one.

    Raises:
        UploadError: Either upload failed (or there is nothing to upload).
    """
    if result.lora is None:
        raise UploadError(f"no exported LoRA to upload for style {style_id}")
    meta = {
        "style_id": style_id,
        "training_epochs": result.metadata.get("num_epochs"),
        "lora_rank": result.metadata.get("network_dim"),
        "lora_alpha": result.metadata.get("network_alpha"),
    }
    # LoHa/LoKr (lora.type in the worker's config): PEFT's tensors, which diffusers does not load
    lycoris = result.metadata.get("lightning_lora_network_type") in ("loha", "lokr")
    model_url = storage.upload_file(
        result.lora.diffusers,
        model_key(style_id),
        {**meta, "format": "peft" if lycoris else "diffusers"},
    )
    if result.lora.kohya is None:  # lora.use_dora: diffusers format only
        storage.delete_keys([kohya_key(style_id)])
        log.info("style %s: DoRA LoRA delivered in diffusers format only", style_id)
        return model_url, None
    kohya_url = storage.upload_file(
        result.lora.kohya,
        kohya_key(style_id),
        {**meta, "format": "lycoris" if lycoris else "kohya"},
    )
    return model_url, kohya_url


def upload_samples(storage: S3Storage, style_id: int, result: TrainResult) -> str | None:
    """Upload the final sample grid to ``models/style_{id}/samples.png``, if the run drew one.

    The samples never fail a trained job: a failed upload is a warning and gives no URL. Only
    S3 being unreachable for the whole retry budget
    (:class:`~lightning_lora.errors.StorageUnavailableError`) is raised, so the job is requeued
    (not failed) and its redelivery uploads the kept LoRA and the samples without training again.
    A run without samples deletes an older job's grid of the style (best effort), so no stale
    grid stands beside the new LoRA.

    Args:
        storage: The bucket.
        style_id: The style trained.
        result: The finished run (``result.lora`` set: rank zero).

    Returns:
        The ``s3://`` URL of the uploaded grid, or ``None`` (no samples, or the upload failed).
    """
    grid = _samples_file(result)
    key = samples_key(style_id)
    try:
        if grid is None:
            storage.delete_keys([key])
            return None
        return storage.upload_file(grid, key, {"style_id": style_id, "format": "png"})
    except StorageUnavailableError:
        raise
    except Exception as exc:
        what = "uploaded" if grid is not None else "cleared"
        log.warning(
            "style %s: samples not %s (the job goes on without them): %s", style_id, what, exc
        )
        return None


def _samples_file(result: TrainResult) -> Path | None:
    if result.lora is None:
        return None
    grid = result.lora.samples or result.lora.folder / SAMPLES_NAME
    return grid if grid.is_file() else None


def upload_model_card(
    storage: S3Storage,
    style_id: int,
    result: TrainResult,
    *,
    with_samples: bool,
    with_kohya: bool,
) -> str:
    """Write the model card of the delivered files and upload it to ``models/style_{id}/README.md``.

    The card is rendered again from the run's metadata for the bucket: it names the files as
    they are stored there (``lora_weights.safetensors``, ``lora_kohya.safetensors``) and links
    ``samples.png`` only when that upload succeeded. It is written to
    ``{output_dir}/delivery/README.md``; the run's own card stays in ``lora/``.

    Args:
        storage: The bucket.
        style_id: The style trained.
        result: The finished run.
        with_samples: Whether ``samples.png`` was uploaded beside it.
        with_kohya: Whether the kohya file was uploaded beside it.

    Returns:
        The card's ``s3://`` URL.

    Raises:
        UploadError: The upload failed (the card is delivered with the model, like the kohya file).
    """
    text = render_model_card(
        result.metadata,
        trigger=result.metadata.get("lightning_lora_trigger"),
        prompts=result.sample_prompts if with_samples else (),
        samples=SAMPLES_NAME if with_samples else None,
        diffusers_weight_name=PurePosixPath(model_key(style_id)).name,
        kohya_weight_name=PurePosixPath(kohya_key(style_id)).name if with_kohya else None,
    )
    card = write_model_card(Path(result.output_dir) / "delivery", text)
    return storage.upload_file(card, model_card_key(style_id), {"style_id": style_id})


def _number(value: Any) -> int | float | None:
    if value is None:
        return None
    value = float(value)
    return int(value) if value.is_integer() else value


def completion_metadata(
    cfg: DictConfig,
    result: TrainResult,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The completion webhook's ``metadata``, from the run's config and counters.

    The callbacks' own figures (memory peaks, throughput, the resumed epoch) are in
    ``result.metrics``: :func:`~lightning_lora.training.run.train` merges every callback's
    ``summary()`` into it.

    Args:
        cfg: The run's config.
        result: What :func:`~lightning_lora.training.run.train` returned.
        extra: More entries (``kohya_url``, ``samples_url``, ``model_card_url``), added last.

    Returns:
        ``training_epochs``, ``lora_rank``, ``lora_alpha`` (the contract's keys) and
        ``total_epochs``, ``training_steps``, ``learning_rate``, ``batch_size``, ``resolution``,
        ``num_images``, ``lora_dropout``, ``target_modules``, ``seed``, ``precision``,
        ``base_model``, ``dataset_hash``, ``samples_per_s``, ``train_seconds``, ``train_loss``,
        ``val_loss``, ``peak_vram_gib`` (CUDA), ``peak_rss_gib``, ``resumed_from_epoch`` (after a
        resume) and ``lightning_lora_version``. Missing figures are left out.
    """
    md = result.metadata
    metrics = result.metrics
    meta: dict[str, Any] = {
        "training_epochs": int(metrics.get("epochs", md.get("num_epochs", 0))),
        "lora_rank": int(md["network_dim"]),
        "lora_alpha": _number(md["network_alpha"]),
        "total_epochs": OmegaConf.select(cfg, "trainer.max_epochs", default=None),
        "training_steps": int(metrics.get("steps", md.get("steps", 0))),
        "learning_rate": float(md["learning_rate"]),
        "batch_size": OmegaConf.select(cfg, "data.batch_size", default=None),
        "resolution": md.get("resolution"),
        "num_images": md.get("num_train_images"),
        "lora_dropout": OmegaConf.select(cfg, "lora.dropout", default=None),
        "target_modules": md.get("target_modules"),
        "seed": md.get("seed"),
        "precision": str(OmegaConf.select(cfg, "trainer.precision", default="")) or None,
        "base_model": md.get("base_model"),
        "dataset_hash": md.get("dataset_hash"),
        "samples_per_s": metrics.get("samples_per_s"),
        "train_seconds": metrics.get("train_seconds"),
        "train_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "peak_vram_gib": metrics.get("peak_vram_gib"),
        "peak_rss_gib": metrics.get("peak_rss_gib"),
        "lightning_lora_version": __version__,
    }
    if "resumed_from_epoch" in metrics:
        meta["resumed_from_epoch"] = int(metrics["resumed_from_epoch"])
    meta.update(extra or {})
    return {k: v for k, v in meta.items() if v is not None}


def report_completion(
    report: JobReport,
    cfg: DictConfig,
    result: TrainResult,
    model_url: str,
    extra: Mapping[str, Any] | None = None,
) -> bool:
    """Report the completion after the final upload succeeded (at most once per job).

    Args:
        report: The job's report.
        cfg: The run's config.
        result: What :func:`~lightning_lora.training.run.train` returned.
        model_url: ``s3://`` URL of the uploaded diffusers LoRA.
        extra: More metadata entries.

    Returns:
        Whether the completion was taken (``False`` if a terminal report was already sent).
    """
    metadata = completion_metadata(cfg, result, extra)
    taken = report.complete(model_url, metadata)
    if taken:
        log.info(
            "training of style %s complete: %s (%d epochs, %d steps)",
            report.style_id,
            model_url,
            metadata["training_epochs"],
            metadata["training_steps"],
        )
    return taken


FINISHED_MARKER = "finished.json"
"""Written beside an exported LoRA once training ended; a requeued job then skips training."""


def _finished_lora(run_dir: Path) -> tuple[LoraFiles, dict[str, Any]] | None:
    """The exported LoRA and summary of a run that already finished training, if any."""
    marker = run_dir / FINISHED_MARKER
    if not marker.is_file():
        return None
    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
        kohya = Path(saved["kohya"]) if saved["kohya"] is not None else None  # None: DoRA
        samples, card = saved.get("samples"), saved.get("card")
        files = LoraFiles(
            Path(saved["folder"]),
            Path(saved["diffusers"]),
            kohya,
            card=Path(card) if card else None,
            samples=Path(samples) if samples else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not files.diffusers.is_file() or (files.kohya is not None and not files.kohya.is_file()):
        return None
    return files, saved


def _train_or_reuse(
    cfg: DictConfig,
    callbacks: list[L.Callback],
    resume_file: Path | None,
    style_token: str | None = None,
) -> TrainResult:
    run_dir = Path(cfg.paths.output_dir)
    reused = _finished_lora(run_dir)
    if reused is not None:
        files, saved = reused
        log.info("run in %s already trained: uploading its LoRA without training again", run_dir)
        return TrainResult(
            output_dir=run_dir,
            lora=files,
            metrics=dict(saved.get("metrics") or {}),
            metadata=dict(saved.get("metadata") or {}),
            sample_prompts=[str(p) for p in saved.get("sample_prompts") or []],
        )
    result = train(cfg, callbacks=callbacks, ckpt_path=resume_file, style_token=style_token)
    if result.lora is not None:
        marker = {
            "folder": str(result.lora.folder),
            "diffusers": str(result.lora.diffusers),
            "kohya": None if result.lora.kohya is None else str(result.lora.kohya),
            "card": None if result.lora.card is None else str(result.lora.card),
            "samples": None if result.lora.samples is None else str(result.lora.samples),
            "sample_prompts": result.sample_prompts,
            "metrics": result.metrics,
            "metadata": result.metadata,
        }
        (run_dir / FINISHED_MARKER).write_text(json.dumps(marker, default=str), encoding="utf-8")
    return result


def run_reported_training(
    cfg: DictConfig,
    report: JobReport,
    storage: S3Storage,
    *,
    callbacks: Sequence[L.Callback] = (),
    resume: bool = True,
    work_dir: str | Path | None = None,
    run_id: str | None = None,
    style_token: str | None = None,
) -> TrainResult:
    """Train, upload the LoRA and report completion, or report the failure and re-raise.

    Args:
        cfg: The composed training config (``paths.output_dir`` set).
        report: The job's report (progress and the one terminal report).
        storage: The bucket for checkpoints and the final LoRA.
        callbacks: More callbacks for the trainer. If one is an :class:`S3CheckpointCallback`,
            it replaces the one built from ``cfg.reporting.s3_checkpoint``.
        resume: Resume from the run's newest usable checkpoint in S3, if any.
        work_dir: Job-local folder for the downloaded resume checkpoint; defaults to
            ``{paths.output_dir}/resume``.
        run_id: The job's run: checkpoints are written to and resumed from
            ``checkpoints/style_{id}/{run_id}/`` only (a new job never resumes an old one).
        style_token: The job's style token, literal text, never put in the config (see
            :func:`~lightning_lora.training.run.train`): it fills ``{token}`` in the validation
            prompts and is the LoRA's trigger word (metadata and model card).

    Returns:
        The run's result (``result.metrics``/``metadata`` as from ``train``).

    Raises:
        BaseException: Whatever ended the job, after :meth:`JobReport.fail` applied the one rule
            to it (e.g. ``InvalidImageError`` -> ``INVALID_IMAGE`` reported, ``UploadError`` ->
            ``UPLOAD_FAILED`` reported, ``StorageUnavailableError`` -> nothing reported).
    """
    style_id = report.style_id
    prefix = checkpoint_prefix(style_id, run_id)
    progress = partial_at(cfg, "reporting.webhook", ProgressCallback)(report)
    resume_file: Path | None = None
    try:
        own: list[L.Callback] = [progress]
        if not any(isinstance(c, S3CheckpointCallback) for c in callbacks):
            own.append(
                partial_at(cfg, "reporting.s3_checkpoint", S3CheckpointCallback)(storage, prefix)
            )
        if resume and _finished_lora(Path(cfg.paths.output_dir)) is None:
            folder = (
                Path(work_dir) if work_dir is not None else Path(cfg.paths.output_dir) / "resume"
            )
            resume_file = find_resume_checkpoint(
                storage,
                prefix,
                folder,
                expect_lora={"rank": cfg.lora.rank, "alpha": cfg.lora.alpha},
            )
        result = _train_or_reuse(cfg, [*own, *callbacks], resume_file, style_token)
        if result.lora is None:  # not global rank zero: rank zero uploads and reports
            return result
        started = time.perf_counter()
        model_url, kohya_url = upload_final_lora(storage, style_id, result)
        samples_url = upload_samples(storage, style_id, result)
        card_url = upload_model_card(
            storage,
            style_id,
            result,
            with_samples=samples_url is not None,
            with_kohya=kohya_url is not None,
        )
        result.metrics["upload_seconds"] = time.perf_counter() - started
        extra = {"kohya_url": kohya_url, "samples_url": samples_url, "model_card_url": card_url}
        extra = {k: v for k, v in extra.items() if v}
        report_completion(report, cfg, result, model_url, extra=extra)
        return result
    except BaseException as exc:
        report.fail(exc)  # the one rule: reported once if a failure, nothing if a requeue
        raise
    finally:
        if resume_file is not None:
            resume_file.unlink(missing_ok=True)
        # a completion or failure queued in the sender (the in-process sink) goes out before
        # returning, within the client's budget; a progress report still waiting is dropped
        if not report.sender.finish(report.sender.client.max_total_s + 30.0):
            log.error("webhooks of style %s not all delivered in time", style_id)
