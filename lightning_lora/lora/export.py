"""Writing the trained LoRA: diffusers format, kohya (A1111/ComfyUI) format, and metadata.

LoRA and LoCon: diffusers' file and kohya's (:mod:`.kohya`). LoHa and LoKr: the diffusers-named
file holds PEFT's tensors (``unet.<module>.hada_w1_a``...) and the adapter config, which PEFT
loads and diffusers' ``load_lora_weights`` does not; the kohya-named file holds LyCORIS keys
(:mod:`.lycoris`), which A1111, ComfyUI, kohya and ``lightning-lora-generate`` load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from lightning_lora.lora.adapters import ADAPTER, adapter_config, target_modules
from lightning_lora.lora.kohya import DORA_NOT_IN_KOHYA, kohya_state_dict
from lightning_lora.lora.lycoris import lycoris_state_dict
from lightning_lora.lora.networks import NetworkConfig
from lightning_lora.lora.safetensors_io import add_metadata, save_file

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
#: LoHa/LoKr's training-time dropouts, zeroed in the metadata like LoRA's.
LYCORIS_DROPOUTS = ("rank_dropout", "module_dropout")


@dataclass(frozen=True)
class LoraFiles:
    """Paths of an exported LoRA.

    Attributes:
        folder: The folder ``pipe.load_lora_weights`` takes.
        diffusers: The diffusers-format file.
        kohya: The kohya-format file (``None`` for DoRA, which kohya's format cannot carry).
        card: The model card beside them (``README.md``), once written.
        samples: The final sample grid beside them (``samples.png``), when the run drew one.
    """

    folder: Path
    diffusers: Path
    kohya: Path | None
    card: Path | None = None
    samples: Path | None = None


def _string_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    return {
        f"ss_{k}" if not k.startswith(("ss_", "lightning_lora")) else k: (
            v if isinstance(v, str) else json.dumps(v)
        )
        for k, v in metadata.items()
    }


def _peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()
    }


def _adapter_metadata(config: NetworkConfig) -> dict[str, Any]:
    # dropout is a training-time setting: loaders that build the adapter from this metadata
    # would otherwise add Dropout modules in train mode and make inference stochastic;
    # target_modules sorted: diffusers lists a set in hash order, which differs per process
    dropouts = ("lora_dropout",) if isinstance(config, LoraConfig) else LYCORIS_DROPOUTS
    return {
        **config.to_dict(),
        **dict.fromkeys(dropouts, 0.0),
        "target_modules": sorted(target_modules(config)),
    }


def export_lora(
    unet: torch.nn.Module,
    folder: str | Path,
    metadata: dict[str, Any],
    text_encoder: torch.nn.Module | None = None,
) -> LoraFiles:
    """Save the LoRA in diffusers and kohya formats with safetensors metadata.

    Args:
        unet: The UNet carrying the trained adapter.
        folder: Output folder (created).
        metadata: Training facts (base model, rank, alpha, epochs, ...); values are stored as
            strings (JSON for non-strings) under ``ss_<key>`` names, as kohya tools expect.
        text_encoder: The text encoder, when it carries a trained adapter too (``text_encoder.``
            keys in the diffusers file, ``lora_te_`` keys in the kohya file).

    Returns:
        The written paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = adapter_config(unet)
    assert config is not None, "the UNet carries no LoRA adapter"
    peft_sd = _peft_state(unet)
    kohya_sd: dict[str, torch.Tensor] | None
    if isinstance(config, LoraConfig):
        kohya_sd = None if config.use_dora else kohya_state_dict(peft_sd, config, "unet")
    else:  # LoHa, LoKr: PEFT's tensors in the diffusers-named file, LyCORIS keys in the other
        kohya_sd = lycoris_state_dict(peft_sd, config, "unet")
    text_kwargs: dict[str, Any] = {}
    if text_encoder is not None:
        te_config = adapter_config(text_encoder)
        assert isinstance(te_config, LoraConfig), "the text encoder carries no LoRA adapter"
        te_sd = _peft_state(text_encoder)
        text_kwargs = {
            "text_encoder_lora_layers": convert_state_dict_to_diffusers(te_sd),
            "text_encoder_lora_adapter_metadata": _adapter_metadata(te_config),
        }
        if kohya_sd is not None:
            kohya_sd.update(kohya_state_dict(te_sd, te_config, "text_encoder"))
    unet_layers: dict[str, Any] = (
        convert_state_dict_to_diffusers(peft_sd) if isinstance(config, LoraConfig) else peft_sd
    )
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=unet_layers,
        safe_serialization=True,
        weight_name=DIFFUSERS_WEIGHT_NAME,
        unet_lora_adapter_metadata=_adapter_metadata(config),
        **text_kwargs,
    )
    string_meta = _string_metadata(metadata)
    diffusers_path = folder / DIFFUSERS_WEIGHT_NAME
    add_metadata(diffusers_path, string_meta)  # also sorts the header: byte-reproducible files
    kohya_path = folder / KOHYA_WEIGHT_NAME
    if kohya_sd is None:
        log.warning(DORA_NOT_IN_KOHYA)
        kohya_path.unlink(missing_ok=True)  # not an older run's file next to this one
        return LoraFiles(folder, diffusers_path, None)
    save_file(kohya_sd, kohya_path, metadata=string_meta)
    return LoraFiles(folder, diffusers_path, kohya_path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """Return the safetensors metadata of a LoRA file."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
