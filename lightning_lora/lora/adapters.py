"""Injecting and resetting the PEFT LoRA adapter of the UNet."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

log = logging.getLogger(__name__)

ADAPTER = "default"


def lora_config(
    rank: int = 16,
    alpha: float = 32,
    dropout: float = 0.1,
    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    init_lora_weights: bool | str = "gaussian",
    use_dora: bool = False,
    use_rslora: bool = False,
    text_encoder: Mapping[str, Any] | None = None,
) -> LoraConfig:
    """Build the PEFT config for the UNet's LoRA.

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        dropout: Dropout on the LoRA branch input.
        target_modules: Names of the linear layers that get an adapter.
        init_lora_weights: PEFT init (``gaussian`` as in diffusers' recipe, ``true`` for
            Kaiming-A/zero-B, ``pissa``, ...).
        use_dora: PEFT's DoRA (a learned magnitude per output feature besides the LoRA).
        use_rslora: Rank-stabilised LoRA: the update is scaled by ``alpha / sqrt(rank)``.
        text_encoder: The ``lora.text_encoder`` section, which this UNet config ignores (so that
            ``instantiate(cfg.lora)`` works);
            :func:`lightning_lora.lora.text_encoder.build_lora_configs` builds the text encoder's
            config from it.

    Returns:
        The config.
    """
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"lora.alpha must be > 0, got {alpha}")
    init: bool | str = init_lora_weights
    if isinstance(init, str) and init.lower() in {"true", "false"}:
        init = init.lower() == "true"
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int; it scales by alpha / r
        lora_dropout=dropout,
        init_lora_weights=init,  # type: ignore[arg-type]  # PEFT checks the name (a Literal there)
        target_modules=list(target_modules),
        use_dora=bool(use_dora),
        use_rslora=bool(use_rslora),
    )


def target_modules(config: LoraConfig) -> set[str]:
    """The names of the layers a LoRA config targets.

    PEFT types ``target_modules`` as ``list[str] | str | None`` (a regular expression, or none to
    use its defaults); the configs built here always list the names, which PEFT keeps as a set.
    """
    targets = config.target_modules
    assert targets is not None and not isinstance(targets, str), f"no name list: {targets!r}"
    return set(targets)


def adapter_config(model: torch.nn.Module) -> LoraConfig | None:
    """The config of ``model``'s :data:`ADAPTER` LoRA, ``None`` without one.

    PEFT and diffusers set ``peft_config`` (adapter name -> config) on the model they add an
    adapter to; it is not a declared attribute of every model class.
    """
    configs: dict[str, LoraConfig] = getattr(model, "peft_config", None) or {}
    return configs.get(ADAPTER)


def same_config(a: LoraConfig, b: LoraConfig) -> bool:
    """Whether two LoRA configs make the same adapter (rank, alpha, dropout, init, targets...)."""
    fields = ("r", "lora_alpha", "lora_dropout", "init_lora_weights", "use_dora", "use_rslora")
    same_fields = all(getattr(a, f) == getattr(b, f) for f in fields)
    return same_fields and target_modules(a) == target_modules(b)


def inject_lora(unet: UNet2DConditionModel, config: LoraConfig, seed: int) -> int:
    """Give the UNet a freshly initialised LoRA adapter, reusing its modules when possible.

    A UNet that already carries an adapter with the same shape (a warm worker's next job, or the
    next run of a multirun) gets its LoRA weights re-initialised in place, so a compiled UNet is not
    recompiled. Initialisation draws from a generator seeded with ``seed`` only, so the adapter
    is the same whether the UNet is fresh or reused.

    Args:
        unet: The frozen UNet.
        config: The LoRA config.
        seed: Seed of the LoRA initialisation.

    Returns:
        The number of trainable parameters.
    """
    existing = adapter_config(unet)
    if existing is not None and not same_config(existing, config):
        unet.delete_adapters(ADAPTER)
        existing = None
    if existing is None:
        unet.add_adapter(config, adapter_name=ADAPTER)
    reset_lora(unet, config, seed)
    unet.set_adapters(ADAPTER)
    return train_only_lora(unet)


def reset_lora(model: torch.nn.Module, config: LoraConfig, seed: int) -> None:
    """Re-initialise every LoRA layer of ``model`` from ``seed`` (the global RNG untouched).

    Args:
        model: A model holding the :data:`ADAPTER` LoRA (the UNet or the text encoder).
        config: Its LoRA config (``init_lora_weights`` and, for DoRA, the variant's settings).
        seed: Seed of the initialisation.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                module.reset_lora_parameters(ADAPTER, config.init_lora_weights)
                variant = getattr(module, "lora_variant", {}).get(ADAPTER)
                if variant is not None:  # DoRA: the magnitude of the weight with the reset LoRA
                    variant.init(module, adapter_name=ADAPTER, config=config)


def train_only_lora(model: torch.nn.Module) -> int:
    """Make only the LoRA parameters of ``model`` trainable; returns how many there are."""
    trainable = 0
    for name, param in model.named_parameters():
        is_lora = "lora_" in name
        param.requires_grad_(is_lora)
        trainable += param.numel() if is_lora else 0
    return trainable


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Return the trainable LoRA parameters as a list (safe to iterate more than once)."""
    return [p for p in unet.parameters() if p.requires_grad]
