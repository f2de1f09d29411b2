"""The benchmark's model and data: random-weight SD1.5-shaped model folders, images, FLOPs.

Two shapes, both with SD1.5's layout (three cross-attention down blocks and one plain, mirrored up
blocks, two layers per block: 16 transformer blocks and 22 ResNet blocks in the UNet):

* ``sd15``: SD1.5's sizes (the ``config.json`` files of ``stable-diffusion-v1-5``: UNet channels
  320/640/1280/1280 with 768-wide cross-attention, the 4-level VAE with 128-512 channels, the
  12-layer 768-wide CLIP-L text encoder).
* ``tiny``: the project's tiny test model (:mod:`lightning_lora.training.models`) with SD1.5's two
layers
  per block, so that regional compilation sees as many repeated blocks as on the real model.

Weights are random (seed 0); folders are saved once and loaded with
:func:`lightning_lora.training.models.load_components` like a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.timers import free_memory
from lightning_lora.training import models

#: Bump when a model folder's build changes, so stale folders are not reused.
MODEL_FOLDER_VERSION = "v2"

SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
)
SD15_CLIP: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
TINY_UNET: dict[str, Any] = {**models.TINY_UNET, "layers_per_block": 2}
TINY_VAE: dict[str, Any] = {**models.TINY_VAE, "layers_per_block": 2}
TINY_CLIP: dict[str, Any] = dict(models.TINY_CLIP)


def shapes(tiny: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The UNet, VAE and text encoder configs of the tiny or the SD1.5 shape."""
    return (TINY_UNET, TINY_VAE, TINY_CLIP) if tiny else (SD15_UNET, SD15_VAE, SD15_CLIP)


def default_model_dir(tiny: bool) -> Path:
    """Where the random-weight model folder of a shape is kept (the project's cache folder)."""
    shape = "tiny" if tiny else "sd15"
    return models.default_cache_dir() / f"bench-{shape}-random-{MODEL_FOLDER_VERSION}"


def build_model_folder(dest: Path, tiny: bool, dtype: torch.dtype, device: str) -> Path:
    """Save a random-weight model of the SD1.5 (or tiny) shape as a diffusers folder.

    Args:
        dest: Folder to create (kept and reused when it already holds a model).
        tiny: The tiny shape instead of SD1.5's.
        dtype: Dtype the weights are saved in.
        device: Where the random initialisation runs (a GPU initialises SD1.5 in seconds).

    Returns:
        ``dest``, loadable with :func:`lightning_lora.training.models.load_components`.
    """
    if (dest / "model_index.json").exists():
        return dest
    unet, vae, text_encoder = shapes(tiny)
    try:
        return models.build_model_folder(
            dest, unet=unet, vae=vae, text_encoder=text_encoder, dtype=dtype, device=device
        )
    finally:
        free_memory()


def make_images(dest: Path, count: int, resolution: int) -> list[Path]:
    """Random-noise JPEG images ``img_0000.jpg ...`` of ``resolution`` pixels (made when missing).

    Args:
        dest: Folder to fill.
        count: Number of images.
        resolution: Side length in pixels.

    Returns:
        The ``count`` image paths (image ``i`` is the same whenever it is made).
    """
    import numpy as np
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    paths = [dest / f"img_{i:04d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            rng = np.random.default_rng(i)
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
    return paths


def unet_train_flops(
    unet_config: dict[str, Any],
    resolution: int,
    rank: int = 16,
    alpha: float = 32,
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
) -> dict[str, int]:
    """Model FLOPs of one sample: a UNet forward and its LoRA-training backward.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (shapes only:
    nothing is computed or allocated). The base weights are frozen, so the backward holds the
    input gradients of every layer and the weight gradients of the LoRA matrices only; no
    gradient-checkpointing recomputation is counted.

    Args:
        unet_config: ``UNet2DConditionModel`` config.
        resolution: Image side in pixels (latents are 1/8 of it).
        rank: LoRA rank.
        alpha: LoRA alpha.
        targets: LoRA target modules.

    Returns:
        ``{"forward": ..., "backward": ...}`` FLOPs per sample.
    """
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
        side = resolution // 8
        latents = torch.randn(1, unet.config.in_channels, side, side)
        context = torch.randn(1, 77, unet.config.cross_attention_dim)
        timesteps = torch.tensor([500])
    with FlopCounterMode(display=False) as forward:
        out = unet(latents, timesteps, context, return_dict=False)[0]
    with FlopCounterMode(display=False) as backward:
        out.float().pow(2).mean().backward()
    return {"forward": forward.get_total_flops(), "backward": backward.get_total_flops()}
