"""Writing the trained LoRA: diffusers format, kohya (A1111/ComfyUI) format, and metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from lightning_lora.lora import ADAPTER
from lightning_lora.safetensors_io import add_metadata, save_file

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"


@dataclass(frozen=True)
class LoraFiles:
    """Paths of an exported LoRA.

    Attributes:
        folder: The folder ``pipe.load_lora_weights`` takes.
        diffusers: The diffusers-format file.
        kohya: The kohya-format file.
    """

    folder: Path
    diffusers: Path
    kohya: Path


def _string_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    return {
        f"ss_{k}" if not k.startswith(("ss_", "lightning_lora")) else k: (
            v if isinstance(v, str) else json.dumps(v)
        )
        for k, v in metadata.items()
    }


def kohya_state_dict(
    peft_state_dict: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """Convert a PEFT UNet LoRA state dict to kohya keys with the run's real alpha.

    diffusers' ``convert_state_dict_to_kohya`` writes ``alpha = rank``; kohya-style loaders scale
    by ``alpha / rank``, so the true alpha is written instead.

    Args:
        peft_state_dict: ``get_peft_model_state_dict(unet)`` output.
        alpha: The LoRA alpha used in training.

    Returns:
        Tensors named ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
    """
    prefixed = {f"unet.{k}": v for k, v in peft_state_dict.items()}
    converted = convert_state_dict_to_kohya(prefixed)
    return {
        k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()
        for k, v in converted.items()
    }


def export_lora(unet: torch.nn.Module, folder: str | Path, metadata: dict[str, Any]) -> LoraFiles:
    """Save the UNet's LoRA in diffusers and kohya formats with safetensors metadata.

    Args:
        unet: The UNet carrying the trained adapter.
        folder: Output folder (created).
        metadata: Training facts (base model, rank, alpha, epochs, ...); values are stored as
            strings (JSON for non-strings) under ``ss_<key>`` names, as kohya tools expect.

    Returns:
        The written paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: LoraConfig = unet.peft_config[ADAPTER]
    peft_sd = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()
    }
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=convert_state_dict_to_diffusers(peft_sd),
        safe_serialization=True,
        weight_name=DIFFUSERS_WEIGHT_NAME,
        # dropout is a training-time setting: loaders that build the adapter from this metadata
        # would otherwise add Dropout modules in train mode and make inference stochastic
        # (target_modules sorted: diffusers lists a set in hash order, which differs per process)
        unet_lora_adapter_metadata={
            **config.to_dict(),
            "lora_dropout": 0.0,
            "target_modules": sorted(config.target_modules),
        },
    )
    string_meta = _string_metadata(metadata)
    diffusers_path = folder / DIFFUSERS_WEIGHT_NAME
    add_metadata(diffusers_path, string_meta)  # also sorts the header: byte-reproducible files
    kohya_path = folder / KOHYA_WEIGHT_NAME
    save_file(kohya_state_dict(peft_sd, config.lora_alpha), str(kohya_path), metadata=string_meta)
    return LoraFiles(folder, diffusers_path, kohya_path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """Return the safetensors metadata of a LoRA file."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
