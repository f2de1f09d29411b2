"""The LoRA files' metadata of a finished run (kohya's ``ss_*`` names where kohya has one)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

__all__ = ["noise_metadata", "training_options_metadata"]


def noise_metadata(module: Any) -> dict[str, Any]:
    """The prediction type, zero-terminal SNR, input perturbation and clip skip of a module.

    kohya's ``ss_v_parameterization`` and ``ss_zero_terminal_snr`` are the strings ``"True"`` /
    ``"False"`` (Python's ``str(bool)``, as kohya writes them), ``ss_clip_skip`` and
    ``ss_ip_noise_gamma`` numbers.

    Args:
        module: A ``LoRAModule``.

    Returns:
        The keys (``ss_`` is added on export), plus ``lightning_lora_prediction_type``.
    """
    config = module.noise_scheduler.config
    prediction_type = str(config["prediction_type"])
    return {
        "v_parameterization": str(prediction_type == "v_prediction"),
        "zero_terminal_snr": str(bool(config.get("rescale_betas_zero_snr", False))),
        "ip_noise_gamma": float(module.hparams.ip_noise_gamma),
        "clip_skip": int(module.clip_skip),
        "lightning_lora_prediction_type": prediction_type,
    }


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
        "lightning_lora_use_dora": bool(getattr(module.lora_config, "use_dora", False)),
        "lightning_lora_use_rslora": bool(getattr(module.lora_config, "use_rslora", False)),
        **noise_metadata(module),
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
