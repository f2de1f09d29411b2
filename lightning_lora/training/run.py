"""``train(cfg)``: the one training path for the CLI, notebooks and the queue worker.

The Hydra entry point (:mod:`lightning_lora.tools.train`) is a thin wrapper around
:func:`train`; notebooks build the same config with
:func:`~lightning_lora.config.compose_config`; the worker composes ``worker.yaml`` and sets the
job's values. Callbacks and loggers are built from the config (``_target_`` entries); callers add
their own (the worker's progress and S3 callbacks) through ``callbacks``. :func:`train` knows no
callback class: a callback contributes to the result through :class:`RunSummary` (figures merged
into the metrics) and :class:`SampleGridSource` (the newest sample grid), and gets the run's style
token through :class:`PromptTemplates`.

Beside the exported LoRA (``lora/``), :func:`train` copies the final sample grid
(``samples.png``) and writes the model card (``README.md``,
:mod:`lightning_lora.lora.model_card`), so the CLI, notebooks and the worker all get both.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MethodType
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_lora.config import plain_dict
from lightning_lora.lora.export import LoraFiles, export_lora
from lightning_lora.lora.model_card import SAMPLES_NAME, render_model_card, write_model_card
from lightning_lora.lora.networks import learning_rates, network_metadata
from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.training.metadata import training_options_metadata
from lightning_lora.training.precision import frozen_weight_dtype, precision_info
from lightning_lora.training.provenance import write_run_info
from lightning_lora.version import __version__

__all__ = [
    "PromptTemplates",
    "RunSummary",
    "SampleGridSource",
    "TrainResult",
    "release_training_memory",
    "train",
]

log = logging.getLogger(__name__)


@runtime_checkable
class RunSummary(Protocol):
    """A callback whose run figures (``samples_per_s``, ``peak_rss_gib``...) join the metrics."""

    def summary(self) -> dict[str, float]:
        """The run's figures, merged into :attr:`TrainResult.metrics` after ``fit``."""
        ...


@runtime_checkable
class SampleGridSource(Protocol):
    """A callback that writes sample grids (:attr:`TrainResult.sample_grid` is its newest)."""

    last_grid: Path | None
    prompts: list[str]


@runtime_checkable
class PromptTemplates(Protocol):
    """A callback whose prompts may hold ``{token}``, replaced by the run's style token."""

    def use_token(self, token: str) -> None:
        """Put ``token`` (literal text, never formatted or interpolated) in place of ``{token}``."""
        ...


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        output_dir: The run's folder.
        lora: The exported LoRA files (``None`` on non-zero ranks).
        metrics: Final logged metrics (``train/loss``, ``val/loss``, ``perf/samples_per_s``, ...)
            plus the run summary (samples, train_seconds, samples_per_s, epochs, steps).
        last_checkpoint: The last Lightning checkpoint, if checkpointing was on.
        sample_grid: The last validation sample grid, if prompts were set.
        metadata: The metadata written into the LoRA files.
        sample_prompts: The prompts of ``sample_grid``, left to right (style token put in).
    """

    output_dir: Path
    lora: LoraFiles | None
    metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    sample_grid: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    sample_prompts: list[str] = field(default_factory=list)

    def objective(self, name: str) -> float:
        """The metric a sweep optimizes.

        Raises:
            KeyError: The run did not log it (a sweep must never get ``None`` silently): the
                message lists the metrics that were logged.
        """
        if name not in self.metrics:
            logged = ", ".join(sorted(self.metrics)) or "none"
            raise KeyError(
                f"optimized_metric {name!r} was not logged by this run (logged: {logged}); "
                "set optimized_metric or make sure validation runs (validation.every_n_epochs)"
            )
        return self.metrics[name]


def _instantiate_dict(node: DictConfig | None, kind: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a named dict (callbacks, loggers)."""
    if not node:
        return []
    out = []
    for name, entry in node.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            log.debug("instantiating %s %s <%s>", kind, name, entry._target_)
            out.append(instantiate(entry))
    return out


def _style_trigger(cfg: DictConfig, captions: Sequence[str], style_token: str | None) -> str | None:
    """The trigger word the captions carried, if any.

    The job's token, else ``data.caption.trigger``, else ``data.token`` when a caption holds it
    (the template puts it only into the captions of images that have none).
    """
    if style_token:
        return style_token
    trigger = str(OmegaConf.select(cfg, "data.caption.trigger", default="") or "").strip()
    if trigger:
        return trigger
    token = str(OmegaConf.select(cfg, "data.token", default="") or "").strip()
    return token if token and any(token in caption for caption in captions) else None


def _write_card(
    lora_files: LoraFiles, metadata: dict[str, Any], grid: Path | None, prompts: Sequence[str]
) -> LoraFiles:
    """Copy the final sample grid beside the LoRA and write the model card there."""
    samples = lora_files.folder / SAMPLES_NAME
    if grid is not None:
        shutil.copyfile(grid, samples)
    else:
        samples.unlink(missing_ok=True)  # not an older run's grid next to this LoRA
    text = render_model_card(
        metadata,
        trigger=metadata.get("lightning_lora_trigger"),
        prompts=prompts,
        samples=SAMPLES_NAME if grid is not None else None,
        diffusers_weight_name=lora_files.diffusers.name,
        kohya_weight_name=lora_files.kohya.name if lora_files.kohya is not None else None,
    )
    card = write_model_card(lora_files.folder, text)
    return replace(lora_files, card=card, samples=samples if grid is not None else None)


def train(
    cfg: DictConfig,
    callbacks: Sequence[L.Callback] = (),
    ckpt_path: str | Path | None = None,
    *,
    style_token: str | None = None,
) -> TrainResult:
    """Train a LoRA as the config says, export it and write its model card beside it.

    Args:
        cfg: The composed config (see ``configs/train.yaml``).
        callbacks: Extra callbacks (the worker adds its webhook and S3 callbacks here).
        ckpt_path: Resume from this Lightning checkpoint (overrides ``cfg.ckpt_path``).
        style_token: The style token of a job (the worker's ``style_token``): literal text that
            never enters the config. It replaces ``{token}`` in the validation prompts (else
            ``data.token`` does) and is recorded as the LoRA's trigger word.

    Returns:
        The outputs and metrics of the run.
    """
    OmegaConf.resolve(cfg)
    output_dir = Path(cfg.paths.output_dir)
    trainer_cb = _instantiate_dict(cfg.get("callbacks"), "callback") + list(callbacks)
    prompt_token = style_token or str(OmegaConf.select(cfg, "data.token", default="") or "")
    for callback in trainer_cb:
        if isinstance(callback, PromptTemplates):
            callback.use_token(prompt_token)
    loggers = _instantiate_dict(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=trainer_cb, logger=loggers or False)
    for run_logger in trainer.loggers:  # the whole resolved config: sweeps see what they vary
        run_logger.log_hyperparams(plain_dict(cfg, resolve=True))
    precision = precision_info(
        str(trainer.precision),
        trainer.strategy.root_device.type,
        requested=str(cfg.trainer.get("precision", trainer.precision)),
    )
    if trainer.is_global_zero:
        log.info(
            "precision %s (requested %s) on %s: frozen weights %s, LoRA parameters %s",
            precision["precision"],
            precision["requested_precision"],
            precision["accelerator"],
            precision["frozen_weight_dtype"],
            precision["lora_parameter_dtype"],
        )
        if "precision_hint" in precision:
            log.info(precision["precision_hint"])
        write_run_info(cfg, output_dir, precision)
    dtype = frozen_weight_dtype(str(trainer.precision), trainer.strategy.root_device.type)
    components = instantiate(cfg.model, torch_dtype=dtype)
    lora, text_encoder_lora, text_encoder_lr = build_lora_configs(cfg.lora)
    # with lora.text_encoder.enabled, latents stay cached but captions are encoded every step
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, _partial_=True)(
        components=components,
        lora=lora,
        caption_dropout=cfg.data.caption_dropout,
        lora_seed=cfg.seed,
        text_encoder_lora=text_encoder_lora,
        text_encoder_lr=text_encoder_lr,
        lora_lr=learning_rates(cfg.lora),
    )
    # the LoRA init above used cfg.seed on every rank (identical weights); the per-step draws
    # (latent samples, noise, timesteps) are decorrelated across data-parallel ranks
    L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.get("allow_tf32", True))
        torch.backends.cudnn.allow_tf32 = bool(cfg.get("allow_tf32", True))
    resume = ckpt_path if ckpt_path is not None else cfg.get("ckpt_path")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    all_callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
    drawn = [c for c in all_callbacks if isinstance(c, SampleGridSource) and c.last_grid]
    grid = drawn[0].last_grid if drawn else None
    sample_prompts = list(drawn[0].prompts) if drawn else []
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update({"epochs": float(trainer.current_epoch), "steps": float(trainer.global_step)})
    for callback in all_callbacks:  # each callback publishes its run summary into the metrics
        if isinstance(callback, RunSummary):
            metrics.update(callback.summary())  # samples_per_s, peak_rss_gib, resumed_from_epoch
    metadata = {
        "lightning_lora_version": __version__,
        "base_model": str(cfg.model.pretrained_model_name_or_path),
        **network_metadata(module.lora_config, module.lora_lr),
        "num_epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "resolution": datamodule.resolution,
        # images per aspect-ratio bucket, as kohya records it (ss_bucket_info in the LoRA files)
        "bucket_info": datamodule.bucket_info(),
        "num_train_images": datamodule.num_images,
        "dataset_hash": datamodule.dataset_hash(),
        "learning_rate": float(cfg.module.optimizer.lr),
        "seed": int(cfg.seed),
        **training_options_metadata(cfg, module),
    }
    trigger = _style_trigger(cfg, [item.caption for item in datamodule.items], style_token)
    if trigger:
        metadata["lightning_lora_trigger"] = trigger
    lora_files = None
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or None
    if trainer.is_global_zero:
        text_encoder = module.text_encoder if module.trains_text_encoder else None
        with module.evaluation_weights():  # the EMA's / schedule-free's weights when they are on
            lora_files = export_lora(module.unet, output_dir / "lora", metadata, text_encoder)
        lora_files = _write_card(lora_files, metadata, grid, sample_prompts)
        summary = {"metrics": metrics, "metadata": metadata, "lora": str(lora_files.diffusers)}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return TrainResult(
        output_dir=output_dir,
        lora=lora_files,
        metrics=metrics,
        last_checkpoint=Path(ckpt) if ckpt else None,
        sample_grid=grid,
        metadata=metadata,
        sample_prompts=sample_prompts,
    )


def release_training_memory(callbacks: Sequence[L.Callback] = ()) -> None:
    """Free what a finished, failed or stopped training held, before the next one.

    Lightning gives every callback of a fit the module's ``log`` and ``log_dict`` (bound methods),
    so a callback that outlives the fit (the worker's plugins, a notebook's) would keep the
    module, its trainer and the optimizer's state alive: they are dropped here. The trainer, the
    module and the optimizer also refer to each other, so they wait for the cycle collector:
    it runs now. Last, the CUDA allocator's cached blocks go back to the device.

    Args:
        callbacks: Callbacks that outlive the training.
    """
    for callback in callbacks:
        for name in ("log", "log_dict"):
            if isinstance(getattr(callback, name, None), MethodType):
                vars(callback).pop(name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
