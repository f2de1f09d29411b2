"""PEFT LoRA state dicts -> kohya keys (A1111/ComfyUI), with the real alpha and rsLoRA.

diffusers' ``convert_state_dict_to_kohya`` renames the LoRA matrices; this adds what it leaves out:

- ``.alpha`` is the run's alpha, not the rank it writes: kohya-style loaders scale by
  ``alpha / rank``. Every module gets the same ``.alpha``; a module whose own alpha differs
  (LoCon's ``conv_alpha``, ``alpha_pattern``) has ``sqrt(own / file alpha)`` folded into each
  factor, which gives every loader the trained delta. diffusers' kohya loader (0.42) turns
  differing alphas into PEFT ``alpha_pattern`` keys that match no module and loads those modules
  at the wrong scale (measured 0.043 off in the tiny UNet's output); A1111, ComfyUI and kohya
  read each module's alpha and would be right either way. For rsLoRA (scale
  ``alpha / sqrt(rank)``) the stored alpha is ``alpha * sqrt(rank)``, which gives the same scale
  in those loaders.
- SD1.5's text encoder is ``lora_te_text_model_encoder_layers_N_...``: diffusers writes SDXL's
  ``lora_te1_``, and transformers 5 drops CLIP's ``text_model.`` level that the SD1.5 checkpoint
  (and so A1111 and ComfyUI) name the modules with.

DoRA has no kohya form: kohya/LyCORIS ``dora_scale`` (what A1111 and ComfyUI read) is a magnitude
per *input* column of ``W + dW``, PEFT's DoRA a magnitude per *output* row; one cannot be rewritten
as the other. ComfyUI's newer output-axis branch divides by the norm of the base weight, not of
``W + dW``, and older ComfyUI and A1111 would broadcast an ``(out, 1)`` scale over the wrong axis
without an error. So a DoRA LoRA is written in diffusers format only (:data:`DORA_NOT_IN_KOHYA`).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils import convert_state_dict_to_kohya
from diffusers.utils.state_dict_utils import StateDictType
from peft import LoraConfig

from lightning_lora.lora.networks import module_rank_alpha

MAGNITUDE = "lora_magnitude_vector"
#: Why a DoRA LoRA has no kohya file.
DORA_NOT_IN_KOHYA = (
    "lora.use_dora=true: the LoRA is written in diffusers format only; kohya's dora_scale (A1111, "
    "ComfyUI) is a magnitude per input column, PEFT's DoRA one per output row, so the kohya "
    "format cannot carry it"
)
#: The diffusers component prefix -> the kohya prefix.
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def kohya_alpha(config: LoraConfig, module_name: str = "") -> float:
    """The ``.alpha`` that gives kohya loaders (``alpha / rank``) PEFT's scale for one module.

    Args:
        config: The LoRA config (``rank_pattern``/``alpha_pattern`` and LoCon's conv settings
            give modules their own rank and alpha).
        module_name: The module's name (``""``: the config's default rank and alpha).

    Returns:
        ``alpha``, or ``alpha * sqrt(rank)`` for rsLoRA.
    """
    rank, alpha = module_rank_alpha(config, module_name)
    return alpha * math.sqrt(rank) if config.use_rslora else alpha


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
        ``<prefix><module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` tensors.

    Raises:
        ValueError: A DoRA state dict (see :data:`DORA_NOT_IN_KOHYA`).
    """
    if config.use_dora or any(MAGNITUDE in k for k in peft_state_dict):
        raise ValueError(DORA_NOT_IN_KOHYA)
    if component not in PREFIXES:
        raise ValueError(f"component must be one of {sorted(PREFIXES)}, got {component!r}")
    file_alpha = kohya_alpha(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state_dict.items():
        module = key.rsplit(".lora_", 1)[0]
        # a module of another alpha (LoCon's convolutions, alpha_pattern, rank_pattern with
        # rsLoRA) carries the ratio in its factors: one alpha in the file, the same deltas
        factor = math.sqrt(kohya_alpha(config, module) / file_alpha)
        if component == "text_encoder" and not key.startswith("text_model."):
            key = f"text_model.{key}"  # the SD1.5 checkpoint's module names
        name = _kohya_name(f"{component}.{key}")
        out[name] = (tensor * factor if factor != 1.0 else tensor).contiguous()
        if name.endswith(".lora_down.weight"):
            out[name.replace(".lora_down.weight", ".alpha")] = torch.tensor(file_alpha)
    return out
