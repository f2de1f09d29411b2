"""Loading Stable Diffusion 1.5 components, and building the tiny SD1.5-shaped test model.

Real models and the tiny one go through the same :func:`load_components` path
(``from_pretrained(path_or_hub_id, subfolder=...)``). The tiny model is built deterministically
from code, saved once as a diffusers pipeline folder in a cache directory, and then loaded like any
other local model: nothing is downloaded by tests, the demo or CI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lightning_lora.training.conditioning import check_clip_skip

log = logging.getLogger(__name__)

#: Bump when the tiny model's architecture or build changes, so stale caches are not reused.
TINY_MODEL_VERSION = "v1"

TINY_UNET: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=32,
)
TINY_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    sample_size=64,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
)
#: SD1.5's noise schedule (scaled_linear betas, epsilon prediction).
SD15_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass
class SDComponents:
    """The frozen parts of an SD1.5 model that LoRA training needs.

    Attributes:
        unet: The denoising UNet (LoRA is injected into it).
        vae: The autoencoder that maps images to latents.
        text_encoder: The CLIP text encoder that conditions the UNet.
        tokenizer: The CLIP tokenizer for captions.
        noise_scheduler: The DDPM training scheduler read from the model folder.
        source: The hub id or local path the components came from.
        clip_skip: Which text encoder layer conditions the UNet (1 = the last; see
            :mod:`lightning_lora.training.conditioning`).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str
    clip_skip: int = 1


_LOADED: dict[tuple[str, str | None, str | None, str], SDComponents] = {}


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    reuse: bool = True,
    clip_skip: int = 1,
) -> SDComponents:
    """Load the SD1.5 components with ``from_pretrained`` and freeze them.

    Args:
        pretrained_model_name_or_path: A hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``)
            or a local diffusers pipeline folder.
        revision: Optional git revision of the hub repository.
        variant: Optional weight variant (for example ``fp16``).
        torch_dtype: Dtype of the frozen weights (half precision saves memory on a GPU).
        reuse: Return the components already loaded by this process for the same arguments
            (the warm worker and multirun load the base model once). LoRA adapters are reset by
            :func:`lightning_lora.lora.adapters.inject_lora`, so nothing carries over between runs.
        clip_skip: ``model.clip_skip``: 1 = the text encoder's last layer, 2 = the penultimate
            one through the final layer norm (kohya's and A1111's convention).

    Returns:
        The frozen components.
    """
    key = (str(pretrained_model_name_or_path), revision, variant, str(torch_dtype))
    if reuse and key in _LOADED:
        return _with_clip_skip(_LOADED[key], clip_skip)
    path = str(pretrained_model_name_or_path)
    log.info(
        "loading base model %s (revision=%s, variant=%s, dtype=%s)",
        path,
        revision,
        variant,
        torch_dtype,
    )
    tokenizer = CLIPTokenizer.from_pretrained(
        path,
        subfolder="tokenizer",
        revision=revision,  # type: ignore[arg-type]  # transformers annotates str; None = default
    )
    text_encoder = CLIPTextModel.from_pretrained(
        path,
        subfolder="text_encoder",
        variant=variant,
        torch_dtype=torch_dtype,
        revision=revision,  # type: ignore[arg-type]  # transformers annotates str; None = default
    )
    vae = AutoencoderKL.from_pretrained(
        path, subfolder="vae", variant=variant, torch_dtype=torch_dtype, revision=revision
    )
    unet = UNet2DConditionModel.from_pretrained(
        path, subfolder="unet", variant=variant, torch_dtype=torch_dtype, revision=revision
    )
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    components = SDComponents(unet, vae, text_encoder, tokenizer, noise_scheduler, path)
    if reuse:
        _LOADED[key] = components
    return _with_clip_skip(components, clip_skip)


def _with_clip_skip(components: SDComponents, clip_skip: int) -> SDComponents:
    """The components with a run's clip skip (the shared, cached ones are not changed)."""
    return replace(components, clip_skip=check_clip_skip(clip_skip, components.text_encoder))


def default_cache_dir() -> Path:
    """Return the folder for built artifacts (``$LIGHTNING_LORA_CACHE`` or ``~/.cache``)."""
    env = os.environ.get("LIGHTNING_LORA_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_lora"


def char_vocab() -> dict[str, int]:
    """Return a character-level CLIP BPE vocabulary: every byte, alone and word-final."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


#: The tiny text encoder (the vocabulary size comes from the tokenizer).
TINY_CLIP: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def save_model_folder(
    dest: str | Path,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
) -> Path:
    """Save the parts as a diffusers pipeline folder, with SD1.5's scheduler.

    Args:
        dest: Folder to create. It is written atomically (built beside it, then renamed), and
            replaces a folder already there.
        tokenizer: The CLIP tokenizer.
        text_encoder: The CLIP text encoder.
        vae: The autoencoder.
        unet: The UNet.

    Returns:
        The folder, loadable with :func:`load_components`.
    """
    dest = Path(dest)
    with _atomic_folder(dest) as tmp:
        _write_parts(tmp, tokenizer, {"text_encoder": text_encoder, "vae": vae, "unet": unet})
    return dest


@contextlib.contextmanager
def _atomic_folder(dest: Path) -> Iterator[Path]:
    """A new folder beside ``dest`` that replaces ``dest`` when the block succeeds.

    Readers never see a half-written model; a failed build leaves nothing behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-build-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_parts(folder: Path, tokenizer: CLIPTokenizer, parts: dict[str, Any]) -> None:
    """Write the tokenizer, each part (a model, or a function making one), scheduler and index.

    A part given as a function is made, saved and dropped before the next one, so a full-size
    build holds one model in memory.
    """
    tokenizer.save_pretrained(folder / "tokenizer")
    for name, part in parts.items():
        model = part() if callable(part) and not isinstance(part, torch.nn.Module) else part
        model.save_pretrained(folder / name)
        del model
    DDPMScheduler(**SD15_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.30.0",
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        ),
        encoding="utf-8",
    )


def _as_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a freshly initialised model unless it already is fp32 (diffusers warns on any cast)."""
    return model if dtype == torch.float32 else model.to(dtype)


def build_model_folder(
    dest: str | Path,
    unet: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Build a random-weight SD1.5-shaped pipeline folder deterministically (seed 0).

    The tokenizer is a real ``CLIPTokenizer`` over a generated character vocabulary; the
    scheduler is SD1.5's. Used for the tiny test model and for the benchmark's full-size SD1.5
    shapes.

    Args:
        dest: Folder to create. It is written atomically (built beside it, then renamed).
        unet: ``UNet2DConditionModel`` config.
        vae: ``AutoencoderKL`` config.
        text_encoder: ``CLIPTextConfig`` fields (``vocab_size`` defaults to the tokenizer's).
        dtype: Dtype the weights are saved in.
        device: Where the random initialisation runs (a GPU initialises SD1.5 in seconds).

    Returns:
        The folder, loadable with :func:`load_components`.
    """
    dest = Path(dest)
    with _atomic_folder(dest) as tmp, torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        vocab = char_vocab()
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
        text_config = CLIPTextConfig(
            **{"vocab_size": len(vocab), **text_encoder},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        parts = {
            "text_encoder": lambda: _as_dtype(CLIPTextModel(text_config), dtype),
            "vae": lambda: _as_dtype(AutoencoderKL(**vae), dtype),
            "unet": lambda: _as_dtype(UNet2DConditionModel(**unet), dtype),
        }
        _write_parts(tmp, tokenizer, parts)
    log.info("built a random-weight SD1.5-shaped model at %s", dest)
    return dest


def build_tiny_model(dest: str | Path) -> Path:
    """Build the tiny SD1.5-shaped model (the demo's, the tests' and CI's).

    The UNet has SD1.5's block layout (three cross-attention down blocks, one plain; mirrored up
    blocks) with few channels; the VAE downsamples by 8 with 4 latent channels; the text encoder is
    a 2-layer CLIP.

    Args:
        dest: Folder to create.

    Returns:
        The folder, loadable with :func:`load_components`.
    """
    return build_model_folder(dest, TINY_UNET, TINY_VAE, TINY_CLIP)


def tiny_model_path(cache_dir: str | Path | None = None) -> str:
    """Return the tiny model's folder, building it on first use.

    Args:
        cache_dir: Where to keep it; defaults to :func:`default_cache_dir`.

    Returns:
        The path as a string (what ``pretrained_model_name_or_path`` takes).
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"tiny-sd15-{TINY_MODEL_VERSION}"
    if not (path / "model_index.json").exists():
        build_tiny_model(path)
    return str(path)
