"""``train(cfg)``: the one training path for the CLI, notebooks and the queue worker.

The Hydra entry point (``lightning-lora-train``) is a thin wrapper around :func:`train`; notebooks
build the same config with :func:`compose_config`; the worker turns a job message into overrides.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import lightning_lora
from lightning_lora.export import LoraFiles, export_lora
from lightning_lora.text_encoder import build_lora_configs
from lightning_lora.validation import ValidationCallback

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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
    """

    output_dir: Path
    lora: LoraFiles | None
    metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    sample_grid: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

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


def compose_config(
    overrides: Sequence[str] = (), output_dir: str | Path | None = None, config_name: str = "train"
) -> DictConfig:
    """Compose the training config as the CLI would, for notebooks, tests and the worker.

    Args:
        overrides: Hydra overrides, e.g. ``["model=tiny", "trainer=cpu", "lora.rank=8"]``.
        output_dir: The run's output folder (the CLI gets one from Hydra).
        config_name: The primary config.

    Returns:
        The config.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def frozen_weight_dtype(precision: str, accelerator: str) -> torch.dtype:
    """Dtype of the frozen weights for a Lightning precision setting (LoRA params stay fp32).

    Args:
        precision: The trainer's resolved precision (``16-mixed``, ``bf16-mixed``, ...).
        accelerator: ``cuda``, ``cpu``, ...

    Returns:
        ``float16`` for 16-bit precision, ``bfloat16`` for bf16, else ``float32``.
    """
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16") and accelerator != "cpu":
        return torch.float16
    return torch.float32


#: The override that a 16-mixed run on a bf16-capable GPU is told about.
BF16_OVERRIDE = "trainer.precision=bf16-mixed"


def precision_info(
    precision: str,
    accelerator: str,
    requested: str | None = None,
    bf16_supported: bool | None = None,
) -> dict[str, str]:
    """The run's effective precision and weight dtypes, and a hint where the GPU does better.

    Args:
        precision: The trainer's resolved precision (``trainer.precision``: Lightning's choice,
            e.g. ``bf16-mixed`` for ``16-mixed`` on a CPU).
        accelerator: ``cuda``, ``cpu``, ...
        requested: The configured ``trainer.precision``.
        bf16_supported: Whether the GPU computes in bf16 (asked of torch when ``None``).

    Returns:
        ``precision`` (effective), ``requested_precision``, ``accelerator``,
        ``frozen_weight_dtype`` (UNet, VAE and text encoder), ``lora_parameter_dtype`` (always
        float32), and ``precision_hint`` on a bf16-capable GPU running ``16-mixed``.
    """
    dtype = frozen_weight_dtype(precision, accelerator)
    info = {
        "precision": precision,
        "requested_precision": str(requested if requested is not None else precision),
        "accelerator": accelerator,
        "frozen_weight_dtype": str(dtype).removeprefix("torch."),
        "lora_parameter_dtype": "float32",
    }
    if precision == "16-mixed" and accelerator == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if bf16_supported:
            info["precision_hint"] = (
                "this GPU supports bf16 but the run uses 16-mixed (fp16 with a GradScaler); "
                f"{BF16_OVERRIDE} needs no GradScaler and lets fused AdamW clip"
            )
    return info


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


def package_versions() -> dict[str, str]:
    """Python, CUDA and the versions of the packages a run depends on (for provenance)."""
    names = [
        "lightning_lora",
        "torch",
        "diffusers",
        "peft",
        "transformers",
        "lightning",
        "hydra-core",
    ]
    found = {"python": platform.python_version(), "cuda": str(torch.version.cuda)}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=CONFIG_DIR.parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _write_run_info(
    cfg: DictConfig, output_dir: Path, precision: dict[str, str] | None = None
) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    info = {"versions": package_versions(), "git_commit": _git_commit(), **(precision or {})}
    (output_dir / "run_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def training_options_metadata(cfg: DictConfig, module: Any) -> dict[str, Any]:
    """The LoRA metadata of the training options (optimizer, loss, timesteps, EMA, variants).

    Args:
        cfg: The resolved config.
        module: The trained ``LoRAModule``.

    Returns:
        kohya's names where kohya has one (``optimizer``, ``text_encoder_lr``, ``min_snr_gamma``,
        ...), ``lightning_lora_<name>`` otherwise.
    """
    hp = module.hparams
    te = module.text_encoder_lora
    ema = hp.get("ema") or {}
    meta: dict[str, Any] = {
        "optimizer": str(cfg.module.optimizer._target_),
        "train_text_encoder": te is not None,
        "text_encoder_lr": hp.text_encoder_lr if te is not None else None,
        "min_snr_gamma": hp.snr_gamma,
        "debiased_estimation": bool(hp.debiased_estimation),
        "loss_type": hp.loss,
        "huber_c": hp.huber_c,
        "lightning_lora_timestep_sampling": hp.timestep_sampling,
        "min_timestep": hp.min_timestep,
        "max_timestep": hp.max_timestep,
        "lightning_lora_ema": bool(ema.get("enabled", False)),
        "lightning_lora_use_dora": bool(module.lora_config.use_dora),
        "lightning_lora_use_rslora": bool(module.lora_config.use_rslora),
    }
    if hp.timestep_sampling == "logit_normal":
        meta["lightning_lora_logit_mean"] = hp.logit_mean
        meta["lightning_lora_logit_std"] = hp.logit_std
    if ema.get("enabled", False):
        meta["lightning_lora_ema_decay"] = float(ema.get("decay", 0.999))
    if te is not None:
        meta["lightning_lora_text_encoder_dim"] = te.r
        meta["lightning_lora_text_encoder_alpha"] = te.lora_alpha
    return meta


def train(
    cfg: DictConfig,
    callbacks: Sequence[L.Callback] = (),
    ckpt_path: str | Path | None = None,
) -> TrainResult:
    """Train a LoRA as the config says and export it.

    Args:
        cfg: The composed config (see ``configs/train.yaml``).
        callbacks: Extra callbacks (the worker adds its webhook and S3 callbacks here).
        ckpt_path: Resume from this Lightning checkpoint (overrides ``cfg.ckpt_path``).

    Returns:
        The outputs and metrics of the run.
    """
    OmegaConf.resolve(cfg)
    output_dir = Path(cfg.paths.output_dir)
    trainer_cb = _instantiate_dict(cfg.get("callbacks"), "callback") + list(callbacks)
    loggers = _instantiate_dict(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=trainer_cb, logger=loggers or False)
    for run_logger in trainer.loggers:  # the whole resolved config: sweeps see what they vary
        run_logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
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
        _write_run_info(cfg, output_dir, precision)
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
    )
    # the LoRA init above used cfg.seed on every rank (identical weights); the per-step draws
    # (latent samples, noise, timesteps) are decorrelated across data-parallel ranks
    L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.get("allow_tf32", True))
        torch.backends.cudnn.allow_tf32 = bool(cfg.get("allow_tf32", True))
    resume = ckpt_path if ckpt_path is not None else cfg.get("ckpt_path")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    validation = next((c for c in trainer.callbacks if isinstance(c, ValidationCallback)), None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update({"epochs": float(trainer.current_epoch), "steps": float(trainer.global_step)})
    for callback in trainer.callbacks:  # each callback publishes its run summary into the metrics
        summary = getattr(callback, "summary", None)
        if callable(summary):
            metrics.update(summary())  # samples_per_s, peak_rss_gib, resumed_from_epoch...
    metadata = {
        "lightning_lora_version": lightning_lora.__version__,
        "base_model": str(cfg.model.pretrained_model_name_or_path),
        "network_module": "networks.lora",
        "network_dim": module.lora_config.r,
        "network_alpha": module.lora_config.lora_alpha,
        "target_modules": sorted(module.lora_config.target_modules),
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
    lora_files = None
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or None
    if trainer.is_global_zero:
        text_encoder = module.text_encoder if module.trains_text_encoder else None
        with module.evaluation_weights():  # the EMA's / schedule-free's weights when they are on
            lora_files = export_lora(module.unet, output_dir / "lora", metadata, text_encoder)
        summary = {"metrics": metrics, "metadata": metadata, "lora": str(lora_files.diffusers)}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return TrainResult(
        output_dir=output_dir,
        lora=lora_files,
        metrics=metrics,
        last_checkpoint=Path(ckpt) if ckpt else None,
        sample_grid=validation.last_grid if validation else None,
        metadata=metadata,
    )


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """``lightning-lora-train``: train with Hydra overrides; returns the sweep objective."""
    result = train(cfg)
    if result.lora is not None:
        print(f"LoRA (diffusers): {result.lora.diffusers}")
        print(f"LoRA (kohya):     {result.lora.kohya or 'not written (DoRA: diffusers only)'}")
        if result.sample_grid:
            print(f"samples:          {result.sample_grid}")
        print(f"metrics:          {result.output_dir / 'summary.json'}")
    name = str(cfg.get("optimized_metric", "val/loss"))
    try:
        return result.objective(name)
    except KeyError:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a sweeper must never optimise a missing value
        log.warning("optimized_metric %r was not logged by this run", name)
        return None


if __name__ == "__main__":
    # `python -m lightning_lora.train`: run the importable `main` (not `__main__.main`), so that
    # process-based launchers (hydra/launcher=local_parallel) can pickle the task by reference
    from lightning_lora.train import main as _importable_main

    _importable_main()
