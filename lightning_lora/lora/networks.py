"""The network types (LoRA, LoCon, LoHa, LoKr): their PEFT configs, per-module settings, groups.

``lora.type`` picks the network; all four train through PEFT on the same UNet:

- ``lora``: LoRA on the attention projections (``lora.target_modules``).
- ``locon``: LoRA on those and on the ResNet and sampler convolutions
  (``lora.conv_target_modules``), as kohya's ``conv_dim``/``conv_alpha``: the 3x3 convolutions
  take ``lora.conv_rank``/``lora.conv_alpha``, the 1x1 ``conv_shortcut`` the linear rank.
- ``loha``: PEFT's LoHa (LyCORIS' Hadamard product of two low-rank pairs) on the same targets.
- ``lokr``: PEFT's LoKr (a Kronecker product, ``decompose_both``, ``decompose_factor``).

Ranks and alphas by module pattern go to PEFT's ``rank_pattern``/``alpha_pattern`` (the
user's patterns first: PEFT takes the first that matches). Learning rates by UNet block and LoRA+
are parameter groups (:func:`parameter_groups`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.utils.other import get_pattern_key

log = logging.getLogger(__name__)

#: A PEFT config of any of the network types.
NetworkConfig = LoraConfig | LoHaConfig | LoKrConfig
NETWORK_TYPES = ("lora", "locon", "loha", "lokr")
#: The SD1.5 UNet's convolutions that LoCon, LoHa and LoKr add to the attention targets.
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
#: The 1x1 convolutions among them: kohya gives these the linear rank, not ``conv_dim``.
POINTWISE_CONVS = ("conv_shortcut",)
#: The name fragments of trainable adapter parameters, per PEFT tuner.
ADAPTER_PARAMETER_MARKERS = ("lora_", "hada_", "lokr_")
#: UNet block regions of the per-block learning rates (kohya's ``*_lr_weight``).
BLOCK_REGIONS = ("down", "mid", "up")
_REGION = re.compile(r"(?:^|\.)(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?")


def network_type(config: NetworkConfig) -> str:
    """``lora``, ``locon``, ``loha`` or ``lokr`` of a config built by ``lora_config``."""
    if isinstance(config, LoHaConfig):
        return "loha"
    if isinstance(config, LoKrConfig):
        return "lokr"
    targets = config.target_modules or ()
    return "locon" if any(t in targets for t in CONV_TARGETS) else "lora"


def rank_of(config: NetworkConfig) -> int:
    """The config's default rank ``r``."""
    return int(config.r)


def alpha_of(config: NetworkConfig) -> float:
    """The config's default alpha (PEFT names it ``lora_alpha`` for LoRA, ``alpha`` otherwise)."""
    return float(config.lora_alpha if isinstance(config, LoraConfig) else config.alpha)


def module_rank_alpha(config: NetworkConfig, module_name: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives one module (``rank_pattern``/``alpha_pattern`` applied).

    Args:
        config: The network's config.
        module_name: The module's name in the model (``down_blocks.0.resnets.0.conv1``).

    Returns:
        ``(rank, alpha)``.
    """
    ranks = dict(config.rank_pattern or {})
    alphas = dict(config.alpha_pattern or {})
    rank = ranks.get(get_pattern_key(list(ranks), module_name), rank_of(config))
    alpha = alphas.get(get_pattern_key(list(alphas), module_name), alpha_of(config))
    return int(rank), float(alpha)


def module_scale(config: NetworkConfig, module_name: str) -> float:
    """PEFT's scale of one module's update: ``alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``)."""
    rank, alpha = module_rank_alpha(config, module_name)
    if isinstance(config, LoraConfig) and config.use_rslora:
        return alpha / math.sqrt(rank)
    return alpha / rank


def _conv_pattern(conv_targets: Sequence[str]) -> str:
    """One PEFT pattern matching the 3x3 convolutions among ``conv_targets``."""
    names = [re.escape(t) for t in conv_targets if t not in POINTWISE_CONVS]
    return "|".join(names)


def build_network_config(
    kind: str,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    conv_target_modules: Sequence[str],
    conv_rank: int | None,
    conv_alpha: float | None,
    rank_pattern: Mapping[str, int],
    alpha_pattern: Mapping[str, float],
    lora_options: Mapping[str, Any],
    lycoris_options: Mapping[str, Any],
) -> NetworkConfig:
    """The PEFT config of a network type (see the module docstring).

    Args:
        kind: One of :data:`NETWORK_TYPES`.
        rank: The default rank.
        alpha: The default alpha.
        target_modules: The attention-style targets.
        conv_target_modules: The convolutions LoCon, LoHa and LoKr add.
        conv_rank: The 3x3 convolutions' rank (``None``: ``rank``).
        conv_alpha: Their alpha (``None``: ``alpha``, or ``conv_rank`` when that is set).
        rank_pattern: Ranks by module-name pattern (they win over ``conv_rank``).
        alpha_pattern: Alphas by module-name pattern.
        lora_options: ``LoraConfig`` fields of LoRA and LoCon (dropout, init, DoRA, rsLoRA).
        lycoris_options: ``LoHaConfig``/``LoKrConfig`` fields (``rank_dropout``,
            ``module_dropout``, and for LoKr ``decompose_both``, ``decompose_factor``).

    Returns:
        The config.

    Raises:
        ValueError: An unknown type, a bad rank or alpha, or an option the type does not have.
    """
    if kind not in NETWORK_TYPES:
        raise ValueError(f"lora.type must be one of {list(NETWORK_TYPES)}, got {kind!r}")
    for name, value in (("rank", rank), ("conv_rank", conv_rank)):
        if value is not None and value < 1:
            raise ValueError(f"lora.{name} must be >= 1, got {value}")
    for name, positive in (("alpha", alpha), ("conv_alpha", conv_alpha)):
        if positive is not None and positive <= 0:
            raise ValueError(f"lora.{name} must be > 0, got {positive}")
    targets = list(target_modules)
    ranks = {str(k): int(v) for k, v in rank_pattern.items()}
    alphas = {str(k): float(v) for k, v in alpha_pattern.items()}
    if kind != "lora":
        targets += [t for t in conv_target_modules if t not in targets]
        convs = _conv_pattern(conv_target_modules)
        if conv_rank is not None and convs:
            ranks.setdefault(convs, int(conv_rank))
            alphas.setdefault(convs, float(conv_alpha if conv_alpha is not None else conv_rank))
        elif conv_alpha is not None and convs:
            alphas.setdefault(convs, float(conv_alpha))
    common: dict[str, Any] = {
        "r": rank,
        "target_modules": targets,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
    }
    if kind in ("lora", "locon"):
        return LoraConfig(lora_alpha=alpha, **common, **lora_options)  # type: ignore[arg-type]  # PEFT annotates int alpha; it scales by alpha / r
    unused = [k for k in ("use_dora", "use_rslora") if lora_options.get(k)]
    if unused:  # a warning, not an error: a sweep over lora.type and these keeps its trials
        log.warning("lora.%s applies to LoRA and LoCon; lora.type=%s ignores it", unused[0], kind)
    options = dict(lycoris_options)
    if kind == "loha":
        options = {
            k: v for k, v in options.items() if k not in ("decompose_both", "decompose_factor")
        }
        return LoHaConfig(alpha=alpha, init_weights=True, **common, **options)  # type: ignore[arg-type]
    return LoKrConfig(alpha=alpha, init_weights=True, **common, **options)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LearningRates:
    """Learning-rate multipliers of the adapter's parameter groups.

    Attributes:
        block: ``down``/``mid``/``up`` -> a multiplier, or a list of one per block of that region
            (``down_blocks.0``, ``down_blocks.1``, ...), as kohya's ``*_lr_weight``.
        plus_ratio: LoRA+: the ``lora_B`` (kohya's ``lora_up``) matrices train at this multiple
            of the learning rate (``None``: off).
    """

    block: Mapping[str, float | Sequence[float]] = field(default_factory=dict)
    plus_ratio: float | None = None

    def __post_init__(self) -> None:
        unknown = set(self.block) - set(BLOCK_REGIONS)
        if unknown:
            raise ValueError(f"lora.block_lr takes {list(BLOCK_REGIONS)}, got {sorted(unknown)}")
        for region, value in self.block.items():
            values = value if isinstance(value, Sequence) else [value]
            if any(float(v) < 0 for v in values):
                raise ValueError(f"lora.block_lr.{region} must be >= 0, got {value}")
        if self.plus_ratio is not None and self.plus_ratio <= 0:
            raise ValueError(f"lora.plus_lr_ratio must be > 0, got {self.plus_ratio}")

    @property
    def is_plain(self) -> bool:
        """Whether every parameter trains at the one learning rate."""
        flat = [
            float(v)
            for value in self.block.values()
            for v in (value if isinstance(value, Sequence) else [value])
        ]
        return self.plus_ratio is None and all(v == 1.0 for v in flat)

    def multiplier(self, name: str) -> float:
        """The learning-rate multiplier of one parameter, by its name.

        Args:
            name: The parameter's name in the UNet or text encoder.

        Returns:
            The block's multiplier (1 outside the UNet's blocks) times the LoRA+ ratio for a
            ``lora_B`` matrix.
        """
        factor = 1.0
        found = _REGION.search(name)
        if found is not None:
            region = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[found[1]]
            value = self.block.get(region, 1.0)
            if isinstance(value, Sequence):
                index = int(found[2] or 0)
                if index >= len(value):
                    raise ValueError(
                        f"lora.block_lr.{region} lists {len(value)} values; {name} is in block "
                        f"{index}"
                    )
                value = value[index]
            factor = float(value)
        if self.plus_ratio is not None and ".lora_B." in name:
            factor *= float(self.plus_ratio)
        return factor


def parameter_groups(
    named: Sequence[tuple[str, torch.nn.Parameter]], lr: float | None, rates: LearningRates
) -> list[dict[str, Any]]:
    """The trainable parameters in groups of one learning rate each.

    Args:
        named: ``(name, parameter)`` of the trainable adapter parameters.
        lr: The base learning rate (``None`` only when ``rates`` is plain).
        rates: The multipliers.

    Returns:
        ``[{"params": [...], "lr": lr * multiplier}, ...]`` in first-seen order (one group
        without ``lr`` when every multiplier is 1).

    Raises:
        ValueError: Multipliers without a base learning rate.
    """
    if rates.is_plain:
        return [{"params": [p for _, p in named]}]
    if lr is None:
        raise ValueError("lora.block_lr / lora.plus_lr_ratio need module.optimizer.lr")
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in named:
        groups.setdefault(rates.multiplier(name), []).append(param)
    return [{"params": ps, "lr": lr * m, "lr_multiplier": m} for m, ps in groups.items()]


def learning_rates(settings: Mapping[str, Any]) -> LearningRates:
    """The ``lora.block_lr`` and ``lora.plus_lr_ratio`` of the ``lora`` config node.

    Args:
        settings: The node (a mapping; an OmegaConf node works).

    Returns:
        The multipliers.
    """
    block = settings.get("block_lr") or {}
    plain: dict[str, float | list[float]] = {
        str(k): [float(x) for x in v] if isinstance(v, Sequence) else float(v)
        for k, v in dict(block).items()
    }
    ratio = settings.get("plus_lr_ratio")
    text_lora = bool((settings.get("text_encoder") or {}).get("enabled", False))
    if ratio is not None and settings.get("type") in ("loha", "lokr") and not text_lora:
        log.warning(
            "lora.plus_lr_ratio applies to LoRA B matrices; lora.type=%s has none (ignored)",
            settings.get("type"),
        )
    return LearningRates(block=plain, plus_ratio=None if ratio is None else float(ratio))


def optimizer_groups(
    unet: Sequence[tuple[str, torch.nn.Parameter]],
    text_encoder: Sequence[tuple[str, torch.nn.Parameter]],
    lr: float | None,
    text_encoder_lr: float | None,
    rates: LearningRates,
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the UNet's, then the text encoder's at its own rate.

    Args:
        unet: The UNet's trainable ``(name, parameter)`` pairs.
        text_encoder: The text encoder's (empty when it does not train).
        lr: The optimizer's learning rate.
        text_encoder_lr: The text encoder's (``None``: ``lr``); the multipliers apply to it too.
        rates: The multipliers.

    Returns:
        The groups.
    """
    groups = parameter_groups(unet, lr, rates)
    if text_encoder:
        base = text_encoder_lr if text_encoder_lr is not None else lr
        for group in parameter_groups(text_encoder, base, rates):
            if text_encoder_lr is not None:
                group["lr"] = float(text_encoder_lr) * group.get("lr_multiplier", 1.0)
            groups.append(group)
    return groups


def _raw_alpha(config: NetworkConfig) -> Any:
    return config.lora_alpha if isinstance(config, LoraConfig) else config.alpha


def network_metadata(config: NetworkConfig, rates: LearningRates) -> dict[str, Any]:
    """The LoRA-file metadata of the network (kohya's and LyCORIS' names where they have one).

    ``network_module`` is kohya's ``networks.lora`` for LoRA and LoCon (``conv_dim`` and
    ``conv_alpha`` in ``network_args``), LyCORIS' ``lycoris.kohya`` for LoHa and LoKr (``algo``
    in ``network_args``), as those trainers write them.

    Args:
        config: The UNet network's config.
        rates: The learning-rate multipliers (``down_lr_weight``... and ``loraplus_lr_ratio`` in
            ``network_args``).

    Returns:
        ``network_module``, ``network_dim``, ``network_alpha``, ``network_args``,
        ``target_modules`` and ``lightning_lora_*`` entries.
    """
    kind = network_type(config)
    targets = sorted(config.target_modules or ())
    args: dict[str, str] = {}
    if kind != "lora":
        conv = next((t for t in targets if t in CONV_TARGETS and t not in POINTWISE_CONVS), None)
        if conv is not None:
            conv_rank, conv_alpha = module_rank_alpha(config, f"resnets.0.{conv}")
            args.update(conv_dim=str(conv_rank), conv_alpha=f"{conv_alpha:g}")
    if kind in ("loha", "lokr"):
        args["algo"] = kind
    if isinstance(config, LoKrConfig):
        args.update(factor=str(config.decompose_factor), decompose_both=str(config.decompose_both))
    for region, value in rates.block.items():
        values = [float(v) for v in (value if isinstance(value, Sequence) else [value])]
        if any(v != 1.0 for v in values):
            args[f"{region}_lr_weight"] = ",".join(f"{v:g}" for v in values)
    if rates.plus_ratio is not None:
        args["loraplus_lr_ratio"] = f"{rates.plus_ratio:g}"
    meta: dict[str, Any] = {
        "network_module": "lycoris.kohya" if kind in ("loha", "lokr") else "networks.lora",
        "network_dim": rank_of(config),
        "network_alpha": _raw_alpha(config),
        "target_modules": targets,
        "lightning_lora_network_type": kind,
    }
    if args:
        meta["network_args"] = args
    if config.rank_pattern:
        meta["lightning_lora_rank_pattern"] = dict(config.rank_pattern)
    if config.alpha_pattern:
        meta["lightning_lora_alpha_pattern"] = dict(config.alpha_pattern)
    return meta


def checkpoint_record(config: NetworkConfig) -> dict[str, Any]:
    """What a checkpoint records of the network, to refuse resuming it as another one."""
    return {
        "type": network_type(config),
        "rank": rank_of(config),
        "alpha": alpha_of(config),
        "target_modules": sorted(config.target_modules or ()),
    }


def check_checkpoint_record(saved: Mapping[str, Any] | None, config: NetworkConfig) -> None:
    """Refuse a checkpoint of another network (its adapter weights would not load).

    Args:
        saved: The checkpoint's record (``None``: none; a record without ``type`` is a LoRA's).
        config: This run's network.

    Raises:
        ValueError: Another type, rank or alpha, naming both.
    """
    if not saved:
        return
    mine = checkpoint_record(config)
    theirs = (saved.get("type", "lora"), saved["rank"], saved["alpha"])
    if theirs != (mine["type"], mine["rank"], mine["alpha"]):
        raise ValueError(
            "checkpoint network type/rank/alpha {}/{}/{} differ from this run's {}/{}/{}".format(
                *theirs, mine["type"], mine["rank"], mine["alpha"]
            )
        )
