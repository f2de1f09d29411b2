"""A reported training: train, upload the LoRA, and tell the backend how it went.

:func:`run_reported_training` is what the queue worker calls for a job::

    sender = build_sender(job.webhook_url, cfg)
    try:
        result = run_reported_training(cfg, job.style_id, sender, S3Storage())
    finally:
        sender.close()

It

1. builds a :class:`~lightning_lora.callbacks.webhook.WebhookCallback` (progress, and failure on
   ``on_exception``) and an :class:`~lightning_lora.callbacks.s3_checkpoint.S3CheckpointCallback`
   from the settings in ``cfg.callbacks.webhook`` and ``cfg.callbacks.s3_checkpoint`` (the
   ``callbacks=production`` preset; defaults apply when they are absent);
2. resumes from the style's newest usable checkpoint in S3 when there is one
   (:func:`~lightning_lora.callbacks.s3_checkpoint.find_resume_checkpoint`);
3. runs :func:`lightning_lora.train.train`;
4. uploads the diffusers LoRA to ``models/style_{id}/lora_weights.safetensors`` and the kohya
   file to ``models/style_{id}/lora_kohya.safetensors`` (:func:`upload_final_lora`; a failure is
   fatal: :class:`~lightning_lora.errors.UploadError`, code ``UPLOAD_FAILED``);
5. posts the completion webhook with the ``s3://`` URL of the diffusers file and metadata taken
   from the run's config and counters (:func:`completion_metadata`);
6. flushes the sender (bounded).

Exactly one terminal webhook is sent per call: the completion on success, or one failure for an
exception anywhere (in ``fit``, reported by the callback's ``on_exception``; before or after
``fit``, e.g. an export or upload error, reported here). The exception is then re-raised so the
worker can settle the message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

import lightning_lora
from lightning_lora.callbacks.s3_checkpoint import S3CheckpointCallback, find_resume_checkpoint
from lightning_lora.callbacks.vram import VramCallback
from lightning_lora.callbacks.webhook import WebhookCallback
from lightning_lora.clients.storage import S3Storage, kohya_key, model_key
from lightning_lora.clients.webhook_client import WebhookClient, WebhookSender
from lightning_lora.errors import UploadError
from lightning_lora.train import TrainResult, train

__all__ = [
    "build_sender",
    "completion_metadata",
    "report_completion",
    "run_reported_training",
    "upload_final_lora",
]

log = logging.getLogger(__name__)

_CLIENT_SETTINGS = ("timeout_s", "max_attempts", "max_total_s", "backoff_base_s", "backoff_max_s")
_S3_CALLBACK_SETTINGS = ("dirpath", "every_n_epochs", "keep_last", "final_wait_s")


def _settings(cfg: DictConfig | Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """The settings-only entry ``cfg.callbacks.<name>`` as a plain dict (empty if absent)."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        node = OmegaConf.select(cfg, f"callbacks.{name}", default=None)
        if node is None:
            return {}
        return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
    return dict(cfg.get("callbacks", {}).get(name) or {})


def build_sender(
    webhook_url: str,
    cfg: DictConfig | Mapping[str, Any] | None = None,
    token: str | None = None,
) -> WebhookSender:
    """A :class:`WebhookSender` for a job's ``webhook_url`` with the configured client settings.

    Args:
        webhook_url: The backend base URL from the job (already allow-listed by the worker).
        cfg: The training config; ``cfg.callbacks.webhook`` may set ``timeout_s``,
            ``max_attempts``, ``max_total_s``, ``backoff_base_s`` and ``backoff_max_s``.
        token: Bearer token; ``INTERNAL_API_TOKEN`` is read at each call when ``None``.

    Returns:
        A started sender; the caller closes it.
    """
    settings = _settings(cfg, "webhook")
    options = {k: settings[k] for k in _CLIENT_SETTINGS if settings.get(k) is not None}
    return WebhookSender(WebhookClient(webhook_url, token=token, **options))


def upload_final_lora(storage: S3Storage, style_id: int, result: TrainResult) -> tuple[str, str]:
    """Upload the exported LoRA files to their final keys.

    Args:
        storage: The bucket.
        style_id: The style trained.
        result: The finished run (``result.lora`` must be set: rank zero).

    Returns:
        ``(model_url, kohya_url)``: the ``s3://`` URLs of ``models/style_{id}/
        lora_weights.safetensors`` (diffusers format) and ``.../lora_kohya.safetensors``.

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
    model_url = storage.upload_file(
        result.lora.diffusers, model_key(style_id), {**meta, "format": "diffusers"}
    )
    kohya_url = storage.upload_file(
        result.lora.kohya, kohya_key(style_id), {**meta, "format": "kohya"}
    )
    return model_url, kohya_url


def _number(value: Any) -> int | float | None:
    if value is None:
        return None
    value = float(value)
    return int(value) if value.is_integer() else value


def completion_metadata(
    cfg: DictConfig,
    result: TrainResult,
    callbacks: Iterable[L.Callback] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The completion webhook's ``metadata``, from the run's config, counters and callbacks.

    Args:
        cfg: The run's config.
        result: What :func:`~lightning_lora.train.train` returned.
        callbacks: The run's extra callbacks: a :class:`VramCallback` gives the memory peaks if
            ``result.metrics`` lacks them, a :class:`WebhookCallback` the resumed epoch.
        extra: More entries (e.g. ``kohya_url``), added last.

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
        "lightning_lora_version": lightning_lora.__version__,
    }
    for callback in callbacks:
        if isinstance(callback, VramCallback):
            summary = callback.summary()
            meta["peak_vram_gib"] = meta["peak_vram_gib"] or summary.get("peak_vram_gib")
            meta["peak_rss_gib"] = meta["peak_rss_gib"] or summary.get("peak_rss_gib")
        elif isinstance(callback, WebhookCallback) and callback.start_epoch > 0:
            meta["resumed_from_epoch"] = callback.start_epoch
    meta.update(extra or {})
    return {k: v for k, v in meta.items() if v is not None}


def report_completion(
    webhook: WebhookCallback,
    cfg: DictConfig,
    result: TrainResult,
    model_url: str,
    callbacks: Iterable[L.Callback] = (),
    extra: Mapping[str, Any] | None = None,
) -> bool:
    """Post the completion webhook after the final upload succeeded (at most once per callback).

    Args:
        webhook: The run's webhook callback (its sender, style and terminal-report guard).
        cfg: The run's config.
        result: What :func:`~lightning_lora.train.train` returned.
        model_url: ``s3://`` URL of the uploaded diffusers LoRA.
        callbacks: The run's callbacks (see :func:`completion_metadata`).
        extra: More metadata entries.

    Returns:
        Whether the completion was queued (``False`` if a terminal report was already sent).
    """
    metadata = completion_metadata(cfg, result, [webhook, *callbacks], extra)
    queued = webhook.report_completion(model_url, metadata)
    if queued:
        log.info(
            "training of style %s complete: %s (%d epochs, %d steps)",
            webhook.style_id,
            model_url,
            metadata["training_epochs"],
            metadata["training_steps"],
        )
    return queued


def run_reported_training(
    cfg: DictConfig,
    style_id: int,
    sender: WebhookSender,
    storage: S3Storage,
    *,
    callbacks: Sequence[L.Callback] = (),
    resume: bool = True,
    work_dir: str | Path | None = None,
    flush_timeout_s: float | None = None,
    run_id: str | None = None,
) -> TrainResult:
    """Train, upload the LoRA and report completion, or report the failure and re-raise.

    Args:
        cfg: The composed training config (``paths.output_dir`` set).
        style_id: The style being trained.
        sender: Sends the webhooks; the caller owns (and closes) it. It is flushed at the end.
        storage: The bucket for checkpoints and the final LoRA.
        callbacks: More callbacks for the trainer. If one is an :class:`S3CheckpointCallback`,
            it replaces the one built from ``cfg.callbacks.s3_checkpoint``.
        resume: Resume from the style's newest usable checkpoint in S3, if any.
        work_dir: Job-local folder for the downloaded resume checkpoint; defaults to
            ``{paths.output_dir}/resume``.
        flush_timeout_s: Most seconds to wait for the webhooks at the end; defaults to the
            client's ``max_total_s`` plus 30 s.
        run_id: The job's identity: checkpoints are written to and resumed from
            ``checkpoints/style_{id}/{run_id}/`` only (a new job never resumes an old one).

    Returns:
        The run's result (``result.metrics``/``metadata`` as from ``train``).

    Raises:
        BaseException: Whatever made the job fail, after exactly one failure webhook was
            queued (e.g. ``InvalidImageError`` -> ``INVALID_IMAGE``, ``UploadError`` ->
            ``UPLOAD_FAILED``, anything else -> ``TRAINING_FAILED``).
    """
    webhook_settings = _settings(cfg, "webhook")
    webhook = WebhookCallback(
        sender, style_id, interval_s=float(webhook_settings.get("interval_s", 30.0))
    )
    resume_file: Path | None = None
    try:
        own: list[L.Callback] = [webhook]
        if not any(isinstance(c, S3CheckpointCallback) for c in callbacks):
            s3_settings = _settings(cfg, "s3_checkpoint")
            options = {k: s3_settings[k] for k in _S3_CALLBACK_SETTINGS if k in s3_settings}
            own.append(S3CheckpointCallback(storage, style_id, run_id=run_id, **options))
        if resume:
            folder = (
                Path(work_dir) if work_dir is not None else Path(cfg.paths.output_dir) / "resume"
            )
            resume_file = find_resume_checkpoint(
                storage,
                style_id,
                folder,
                expect_lora={"rank": cfg.lora.rank, "alpha": cfg.lora.alpha},
                run_id=run_id,
            )
        result = train(cfg, callbacks=[*own, *callbacks], ckpt_path=resume_file)
        if result.lora is None:  # not global rank zero: rank zero uploads and reports
            return result
        started = time.perf_counter()
        model_url, kohya_url = upload_final_lora(storage, style_id, result)
        result.metrics["upload_seconds"] = time.perf_counter() - started
        report_completion(
            webhook, cfg, result, model_url, callbacks, extra={"kohya_url": kohya_url}
        )
        return result
    except BaseException as exc:
        webhook.report_failure(exc)  # no-op if on_exception already reported it
        raise
    finally:
        if resume_file is not None:
            resume_file.unlink(missing_ok=True)
        timeout = flush_timeout_s
        if timeout is None:
            timeout = sender.client.max_total_s + 30.0
        if not sender.flush(timeout):
            log.error("webhooks of style %s not all delivered within %.0fs", style_id, timeout)
