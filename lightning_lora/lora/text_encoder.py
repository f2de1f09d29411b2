"""The optional LoRA of the CLIP text encoder: its config, injection and kohya keys.

The UNet's and the text encoder's settings live in one config node, ``lora``, with the text
encoder's own rank, alpha, learning rate and target modules under ``lora.text_encoder``; its
dropout, init, DoRA and rsLoRA follow the UNet's. It is a plain LoRA whatever ``lora.type`` the
UNet trains (kohya and LyCORIS mix module types in one file; every loader reads each module's).
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import LoraConfig
from peft.functional import delete_adapter, inject_adapter_in_model, set_adapter
from transformers import CLIPTextModel

from lightning_lora.config import plain_dict
from lightning_lora.lora.adapters import (
    ADAPTER,
    adapter_config,
    lora_config,
    reset_lora,
    same_config,
    train_only_lora,
)
from lightning_lora.lora.networks import NetworkConfig

#: Default target modules of the text encoder's LoRA (CLIP attention projections).
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def build_lora_configs(
    node: DictConfig,
) -> tuple[NetworkConfig, LoraConfig | None, float | None]:
    """The UNet's LoRA config, the text encoder's (or ``None``) and its learning rate.

    Args:
        node: The ``lora`` config node (``_target_: lightning_lora.lora.adapters.lora_config`` plus
        the
            ``text_encoder`` section).

    Returns:
        ``(unet_config, text_encoder_config, text_encoder_lr)``.
    """
    settings = plain_dict(node, resolve=True)
    text = dict(settings.get("text_encoder") or {})
    unet = instantiate(settings)
    if not text.get("enabled", False):
        return unet, None, None
    te = lora_config(  # always plain LoRA: the UNet's network type is the UNet's alone
        rank=int(text.get("rank", unet.r)),
        alpha=float(text.get("alpha", settings.get("alpha", 32))),
        dropout=float(settings.get("dropout", 0.0)),
        target_modules=list(text.get("target_modules") or TEXT_ENCODER_TARGETS),
        init_lora_weights=settings.get("init_lora_weights", "gaussian"),
        use_dora=bool(settings.get("use_dora", False)),
        use_rslora=bool(settings.get("use_rslora", False)),
    )
    assert isinstance(te, LoraConfig)  # lora_config's default type
    lr = text.get("lr")
    return unet, te, None if lr is None else float(lr)


def inject_text_encoder_lora(
    text_encoder: CLIPTextModel, config: LoraConfig | None, seed: int
) -> int:
    """Give the text encoder a fresh LoRA, or remove one a previous run in this process left.

    Like :func:`lightning_lora.lora.adapters.inject_lora` (a reused adapter of the same shape is
    re-initialised in place from ``seed``), with PEFT's functional API (transformers'
    ``add_adapter`` wants a newer PEFT than diffusers does).

    Args:
        text_encoder: The frozen ``CLIPTextModel`` (shared by the runs of a process).
        config: The LoRA config, or ``None`` to train no text-encoder LoRA.
        seed: Seed of the initialisation.

    Returns:
        The number of trainable parameters added.
    """
    existing = adapter_config(text_encoder)
    if existing is not None and (config is None or not same_config(existing, config)):
        delete_adapter(text_encoder, adapter_name=ADAPTER, prefix="lora_")
        del text_encoder.peft_config[ADAPTER]
        existing = None
    if config is None:
        return 0
    if existing is None:
        inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)
        # what get_peft_model_state_dict reads
        text_encoder.peft_config = {ADAPTER: config}  # type: ignore[dict-item]  # transformers' PeftConfigLike does not match PEFT's LoraConfig
    reset_lora(text_encoder, config, seed)
    set_adapter(text_encoder, ADAPTER)
    return train_only_lora(text_encoder)
