"""The LoRA files' metadata of a finished run (kohya's ``ss_*`` names where kohya has one)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

__all__ = ["training_options_metadata"]


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
