"""PEFT LoRA state dicts -> kohya keys (A1111/ComfyUI), with the real alpha, rsLoRA and DoRA.

diffusers' ``convert_state_dict_to_kohya`` renames the LoRA matrices; this adds what it leaves out:

- ``.alpha`` is the run's alpha, not the rank it writes: kohya-style loaders scale by
  ``alpha / rank``. For rsLoRA (scale ``alpha / sqrt(rank)``) the stored alpha is
  ``alpha * sqrt(rank)``, which gives the same scale in those loaders.
- DoRA magnitudes become ``<module>.dora_scale`` shaped ``(out_features, 1)``: the layout ComfyUI
  reads as a magnitude per output feature (``weight_decompose`` with ``wd_on_output_axis``), which
  is PEFT's DoRA; diffusers' kohya loader reads it back too. diffusers' converter does not rename
  UNet magnitudes (its DoRA rename sits in an ``elif`` after the ``unet`` one).
- SD1.5's text encoder is ``lora_te_...`` (diffusers writes SDXL's ``lora_te1_``).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils import convert_state_dict_to_kohya
from diffusers.utils.state_dict_utils import StateDictType
from peft import LoraConfig

MAGNITUDE = "lora_magnitude_vector"
#: The diffusers component prefix -> the kohya prefix.
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def kohya_alpha(config: LoraConfig) -> float:
    """The ``.alpha`` that gives kohya loaders (``alpha / rank``) PEFT's scale."""
    alpha = float(config.lora_alpha)
    return alpha * math.sqrt(config.r) if config.use_rslora else alpha


def _kohya_name(key: str) -> str:
    """The kohya name of one prefixed PEFT LoRA key (``unet.`` or ``text_encoder.``)."""
    converted = convert_state_dict_to_kohya({key: torch.zeros(1, 1)}, StateDictType.PEFT)
    (name,) = (k for k in converted if not k.endswith(".alpha"))
    return name.replace("lora_te1_", "lora_te_", 1) if name.startswith("lora_te1_") else name


def kohya_state_dict(
    peft_state_dict: dict[str, torch.Tensor], config: LoraConfig, component: str = "unet"
) -> dict[str, torch.Tensor]:
    """Convert one component's PEFT LoRA state dict to kohya keys.

    Args:
        peft_state_dict: ``get_peft_model_state_dict(model)`` output (float tensors).
        config: The component's LoRA config (rank, alpha, rsLoRA).
        component: ``unet`` or ``text_encoder``.

    Returns:
        ``<prefix><module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (and
        ``.dora_scale`` for DoRA) tensors.
    """
    if component not in PREFIXES:
        raise ValueError(f"component must be one of {sorted(PREFIXES)}, got {component!r}")
    alpha = torch.tensor(kohya_alpha(config))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state_dict.items():
        if MAGNITUDE in key:
            stem = key.split(f".{MAGNITUDE}")[0]
            down = _kohya_name(f"{component}.{stem}.lora_A.weight")
            out[down.replace(".lora_down.weight", ".dora_scale")] = tensor.reshape(-1, 1)
            continue
        name = _kohya_name(f"{component}.{key}")
        out[name] = tensor.contiguous()
        if name.endswith(".lora_down.weight"):
            out[name.replace(".lora_down.weight", ".alpha")] = alpha.clone()
    return out
