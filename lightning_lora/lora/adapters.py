"""Injecting and resetting the PEFT adapter (LoRA, LoCon, LoHa or LoKr) of the UNet."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer

from lightning_lora.lora.networks import ADAPTER_PARAMETER_MARKERS as MARKERS
from lightning_lora.lora.networks import CONV_TARGETS, NetworkConfig, build_network_config

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
    type: str = "lora",
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    conv_target_modules: Sequence[str] = CONV_TARGETS,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    decompose_both: bool = False,
    decompose_factor: int = -1,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    block_lr: Mapping[str, Any] | None = None,
    plus_lr_ratio: float | None = None,
) -> NetworkConfig:
    """Build the PEFT config of the UNet's network (``lora.*``; see :mod:`.networks`).

    Args:
        rank: The rank ``r``.
        alpha: The alpha; the update is scaled by ``alpha / rank``.
        dropout: Dropout on the LoRA branch input (LoRA and LoCon).
        target_modules: Names of the linear layers that get an adapter.
        init_lora_weights: PEFT init of LoRA/LoCon (``gaussian`` as in diffusers' recipe, ``true``
            for Kaiming-A/zero-B, ``pissa``, ...).
        use_dora: PEFT's DoRA (a learned magnitude per output feature besides the LoRA).
        use_rslora: Rank-stabilised LoRA: the update is scaled by ``alpha / sqrt(rank)``.
        text_encoder: The ``lora.text_encoder`` section, which this UNet config ignores (so that
            ``instantiate(cfg.lora)`` works);
            :func:`lightning_lora.lora.text_encoder.build_lora_configs` builds the text encoder's
            config from it.
        type: ``lora``, ``locon``, ``loha`` or ``lokr``.
        conv_rank: Rank of the 3x3 convolutions of LoCon/LoHa/LoKr (``None``: ``rank``).
        conv_alpha: Their alpha (``None``: ``conv_rank`` when set, else ``alpha``).
        conv_target_modules: The convolutions LoCon, LoHa and LoKr add to the targets.
        rank_pattern: Ranks by module-name pattern (PEFT's ``rank_pattern``).
        alpha_pattern: Alphas by module-name pattern (PEFT's ``alpha_pattern``).
        decompose_both: LoKr: factor the first Kronecker matrix too.
        decompose_factor: LoKr: the factorisation's factor (-1: the most balanced).
        rank_dropout: LoHa/LoKr: dropout of rows of the update.
        module_dropout: LoHa/LoKr: probability of skipping a module's update in a step.
        block_lr: Learning-rate multipliers by UNet block, read by
            :func:`~lightning_lora.lora.networks.learning_rates` (ignored here).
        plus_lr_ratio: LoRA+'s ratio, read there too (ignored here).

    Returns:
        The config.
    """
    del text_encoder, block_lr, plus_lr_ratio  # other consumers read these sections
    init: bool | str = init_lora_weights
    if isinstance(init, str) and init.lower() in {"true", "false"}:
        init = init.lower() == "true"
    return build_network_config(
        type,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
        conv_target_modules=conv_target_modules,
        conv_rank=conv_rank,
        conv_alpha=conv_alpha,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_options={
            "lora_dropout": dropout,
            "init_lora_weights": init,
            "use_dora": bool(use_dora),
            "use_rslora": bool(use_rslora),
        },
        lycoris_options={
            "rank_dropout": float(rank_dropout),
            "module_dropout": float(module_dropout),
            "decompose_both": bool(decompose_both),
            "decompose_factor": int(decompose_factor),
        },
    )


def target_modules(config: NetworkConfig) -> set[str]:
    """The names of the layers a LoRA config targets.

    PEFT types ``target_modules`` as ``list[str] | str | None`` (a regular expression, or none to
    use its defaults); the configs built here always list the names, which PEFT keeps as a set.
    """
    targets = config.target_modules
    assert targets is not None and not isinstance(targets, str), f"no name list: {targets!r}"
    return set(targets)


def adapter_config(model: torch.nn.Module) -> NetworkConfig | None:
    """The config of ``model``'s :data:`ADAPTER` LoRA, ``None`` without one.

    PEFT and diffusers set ``peft_config`` (adapter name -> config) on the model they add an
    adapter to; it is not a declared attribute of every model class.
    """
    configs: dict[str, NetworkConfig] = getattr(model, "peft_config", None) or {}
    return configs.get(ADAPTER)


def same_config(a: NetworkConfig, b: NetworkConfig) -> bool:
    """Whether two configs make the same adapter (type, ranks, alphas, init, targets...)."""
    return type(a) is type(b) and _comparable(a) == _comparable(b)


def _comparable(config: NetworkConfig) -> dict[str, Any]:
    # PEFT turns a target list into a set when it injects: compare the names, not the container
    return {
        k: sorted(v) if isinstance(v, set | list | tuple) else v
        for k, v in config.to_dict().items()
    }


def inject_lora(unet: UNet2DConditionModel, config: NetworkConfig, seed: int) -> int:
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
        # every PEFT wrapper back to its base layer: another type's wrappers would otherwise
        # stay and the new adapter would wrap them (a sweep over lora.type in one process)
        unet.unload_lora()
        existing = None
    if existing is None:
        unet.add_adapter(config, adapter_name=ADAPTER)
    reset_lora(unet, config, seed)
    unet.set_adapters(ADAPTER)
    return train_only_lora(unet)


def reset_lora(model: torch.nn.Module, config: NetworkConfig, seed: int) -> None:
    """Re-initialise every adapter layer of ``model`` from ``seed`` (the global RNG untouched).

    Args:
        model: A model holding the :data:`ADAPTER` LoRA (the UNet or the text encoder).
        config: Its LoRA config (``init_lora_weights`` and, for DoRA, the variant's settings).
        seed: Seed of the initialisation.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer) and isinstance(config, LoraConfig):
                if ADAPTER not in module.lora_A:
                    continue
                module.reset_lora_parameters(ADAPTER, config.init_lora_weights)
                variant = getattr(module, "lora_variant", {}).get(ADAPTER)
                if variant is not None:  # DoRA: the magnitude of the weight with the reset LoRA
                    variant.init(module, adapter_name=ADAPTER, config=config)
            elif isinstance(module, LycorisLayer) and ADAPTER in module._available_adapters:
                _reset_lycoris(module, getattr(config, "init_weights", True))


def _reset_lycoris(module: LycorisLayer, init_weights: bool | str) -> None:
    """PEFT's LoHa/LoKr initialisation of one layer, as ``update_layer`` picks it."""
    if init_weights == "lycoris":
        module.reset_adapter_parameters_lycoris_way(ADAPTER)  # type: ignore[attr-defined]  # LoKr's
    elif init_weights:
        module.reset_adapter_parameters(ADAPTER)
    else:
        module.reset_adapter_parameters_random(ADAPTER)  # type: ignore[attr-defined]  # LoHa's, LoKr's


def train_only_lora(model: torch.nn.Module) -> int:
    """Make only the adapter parameters of ``model`` trainable; returns how many there are."""
    trainable = 0
    for name, param in model.named_parameters():
        is_lora = any(marker in name for marker in MARKERS)
        param.requires_grad_(is_lora)
        trainable += param.numel() if is_lora else 0
    return trainable


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Return the trainable LoRA parameters as a list (safe to iterate more than once)."""
    return [p for p in unet.parameters() if p.requires_grad]
