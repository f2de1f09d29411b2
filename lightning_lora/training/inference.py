"""Inference: pipelines over loaded components, sample images and grids, LoRAs as adapters.

:func:`sample_images` generates with the module being trained (the validation and style-report
callbacks); :func:`load_pipeline` and :func:`add_loras` load a base model and trained LoRAs for
``lightning-lora-generate`` and the demo's checks.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_lora.lora.export import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, read_metadata
from lightning_lora.lora.lycoris import add_lycoris_adapter, is_lycoris_key
from lightning_lora.training.conditioning import prompt_embeddings
from lightning_lora.training.models import SDComponents, load_components
from lightning_lora.training.noise import configure_scheduler
from lightning_lora.training.sample_prompts import SamplePrompt

if TYPE_CHECKING:
    from lightning_lora.training.module import LoRAModule

log = logging.getLogger(__name__)


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Paste images into one grid image.

    Every cell is as wide as the widest image and as high as the highest; an image of another
    size is pasted centred in its cell, on white, at its own size (padded, never resized). With
    equal sizes the images tile the grid exactly.

    Args:
        images: The images, row by row.
        cols: Columns; defaults to ``ceil(sqrt(n))``.

    Returns:
        The grid.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(img.size[0] for img in images)
    h = max(img.size[1] for img in images)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        x = (i % cols) * w + (w - img.size[0]) // 2
        y = (i // cols) * h + (h - img.size[1]) // 2
        grid.paste(img, (x, y))
    return grid


def build_pipeline(
    components: SDComponents, unet: UNet2DConditionModel | None = None
) -> StableDiffusionPipeline:
    """An inference pipeline over already-loaded components (nothing is loaded again).

    Args:
        components: The frozen SD1.5 parts.
        unet: The UNet to use (defaults to ``components.unet``).

    Returns:
        A ``StableDiffusionPipeline`` with a DPM-Solver++ scheduler and no safety checker.
    """
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=unet or components.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None,  # type: ignore[arg-type]  # diffusers accepts None; not in its annotation
        feature_extractor=None,  # type: ignore[arg-type]  # diffusers accepts None; not in its annotation
        requires_safety_checker=False,
    )


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    resolution: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    lora_scale: float | None = None,
    clip_skip: int = 1,
) -> list[Image.Image]:
    """Generate one image per prompt at a fixed seed (the same noise for every call).

    Args:
        pipe: The pipeline.
        prompts: Prompts.
        resolution: Image side in pixels.
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale.
        seed: Seed of the initial noise (per prompt: ``seed + index``).
        lora_scale: Scale of the LoRA adapter (``None`` keeps the adapter as it is).
        clip_skip: The text encoder layer of the conditioning (kohya's count; 1 = the last).

    Returns:
        The images.
    """
    samples = [
        SamplePrompt(p, "", seed + i, resolution, resolution, steps, guidance_scale)
        for i, p in enumerate(prompts)
    ]
    return generate_samples(pipe, samples, lora_scale, clip_skip)


def _prompt_arguments(
    pipe: StableDiffusionPipeline, sample: SamplePrompt, clip_skip: int, lora_scale: float | None
) -> dict[str, Any]:
    """The pipeline's prompt arguments: the texts, or with clip skip their embeddings.

    With clip skip, the prompt and the negative prompt (``""`` when none, the pipeline's own
    unconditional text) are encoded by :func:`prompt_embeddings`, with a text encoder LoRA at
    ``lora_scale`` as the pipeline's ``encode_prompt`` scales it.
    """
    if clip_skip <= 1:
        return {"prompt": sample.prompt, "negative_prompt": sample.negative_prompt or None}
    scaled = lora_scale is not None and lora_scale != 1.0
    if scaled:
        scale_lora_layers(pipe.text_encoder, lora_scale)
    try:
        return {
            "prompt_embeds": prompt_embeddings(
                pipe.tokenizer, pipe.text_encoder, sample.prompt, clip_skip
            ),
            "negative_prompt_embeds": prompt_embeddings(
                pipe.tokenizer, pipe.text_encoder, sample.negative_prompt, clip_skip
            ),
        }
    finally:
        if scaled:
            unscale_lora_layers(pipe.text_encoder, lora_scale)


@torch.no_grad()
def generate_samples(
    pipe: StableDiffusionPipeline,
    samples: Sequence[SamplePrompt],
    lora_scale: float | None = None,
    clip_skip: int = 1,
) -> list[Image.Image]:
    """Generate one image per sample prompt, each with its own seed, size, steps and guidance.

    The initial noise is drawn on the CPU from the prompt's seed alone, so a prompt gives the same
    image wherever it stands in the list.

    Args:
        pipe: The pipeline.
        samples: Prompts with every setting filled (:meth:`SamplePrompt.filled`).
        lora_scale: Scale of the LoRA adapter (``None`` keeps the adapter as it is).
        clip_skip: The text encoder layer of the conditioning (kohya's count; 1 = the last).

    Returns:
        The images, at each prompt's size.
    """
    device = pipe.unet.device
    images = []
    kwargs: dict[str, Any] = {}
    if lora_scale is not None:
        kwargs["cross_attention_kwargs"] = {"scale": lora_scale}
    for sample in samples:
        assert sample.seed is not None and sample.width and sample.height, "fill() the prompt"
        gen = torch.Generator(device="cpu").manual_seed(sample.seed)
        shape = (
            1,
            pipe.unet.config.in_channels,
            sample.height // pipe.vae_scale_factor,
            sample.width // pipe.vae_scale_factor,
        )
        latents = torch.randn(shape, generator=gen).to(device, pipe.unet.dtype)
        out = pipe(
            **_prompt_arguments(pipe, sample, clip_skip, lora_scale),
            height=sample.height,
            width=sample.width,
            num_inference_steps=sample.steps,
            guidance_scale=sample.guidance_scale,
            latents=latents,
            output_type="pil",
            **kwargs,
        )
        images.append(out.images[0])
    return images


def sample_images(
    pl_module: LoRAModule,
    prompts: Sequence[str],
    resolution: int,
    steps: int,
    guidance_scale: float,
    seed: int,
) -> list[Image.Image]:
    """Generate with the module being trained, then put it back as it was for training.

    The UNet and text encoder are switched to eval mode (LoRA dropout off) and, when EMA or
    schedule-free is on, to their averaged weights.

    Args:
        pl_module: The :class:`~lightning_lora.training.module.LoRAModule`.
        prompts: One image per prompt.
        resolution: Image side in pixels.
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale.
        seed: Seed of the noise (per prompt: ``seed + index``).

    Returns:
        The images.
    """
    samples = [
        SamplePrompt(p, "", seed + i, resolution, resolution, steps, guidance_scale)
        for i, p in enumerate(prompts)
    ]
    return sample_prompt_images(pl_module, samples)


def sample_prompt_images(
    pl_module: LoRAModule, samples: Sequence[SamplePrompt]
) -> list[Image.Image]:
    """:func:`sample_images` for prompts with their own settings (:func:`generate_samples`).

    The pipeline's scheduler is built from the module's training scheduler (its prediction type
    and zero-terminal-SNR betas) and the prompts are encoded with the module's clip skip.

    Args:
        pl_module: The :class:`~lightning_lora.training.module.LoRAModule`.
        samples: Prompts with every setting filled.

    Returns:
        The images.
    """
    components = SDComponents(
        pl_module.unet,
        pl_module.vae,
        pl_module.text_encoder,
        pl_module.tokenizer,
        pl_module.noise_scheduler,
        "",
    )
    pipe = build_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    was_training = pl_module.unet.training, pl_module.text_encoder.training
    pl_module.unet.eval()
    pl_module.text_encoder.eval()  # a trained text encoder's LoRA dropout off too
    # the EMA's / schedule-free's averaged weights when they are on
    weights = getattr(pl_module, "evaluation_weights", contextlib.nullcontext)
    try:
        with weights():
            return generate_samples(pipe, samples, clip_skip=pl_module.clip_skip)
    finally:
        pl_module.unet.train(was_training[0])
        pl_module.text_encoder.train(was_training[1])
        cast_training_params([pl_module.unet, pl_module.text_encoder], dtype=torch.float32)


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA loaded into a pipeline.

    Attributes:
        adapter: Its adapter name in the pipeline.
        source: The path or hub id it came from.
        weight: Its ``set_adapters`` weight (multiplied by the LoRA scale when generating).
    """

    adapter: str
    source: str
    weight: float


def _lora_location(source: str | Path) -> tuple[str, str | None]:
    """``(folder_or_hub_id, weight_name)`` for ``load_lora_weights``."""
    path = Path(source)
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            meta = read_metadata(path / DIFFUSERS_WEIGHT_NAME)
            lycoris = meta.get("lightning_lora_network_type") in ("loha", "lokr")
            if lycoris and (path / KOHYA_WEIGHT_NAME).is_file():  # diffusers takes no LoHa/LoKr
                return str(path), KOHYA_WEIGHT_NAME
            return str(path), DIFFUSERS_WEIGHT_NAME
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return str(path), files[0].name
        raise ValueError(
            f"{path} holds {len(files)} .safetensors files and no {DIFFUSERS_WEIGHT_NAME}; "
            "pass the file itself"
        )
    return str(source), None  # a hub id


def lora_file(source: str | Path) -> Path | None:
    """The local ``.safetensors`` file that ``load_lora_weights`` reads (``None``: a hub id)."""
    location, weight_name = _lora_location(source)
    path = Path(location) / weight_name if weight_name else None
    return path if path is not None and path.is_file() else None


def load_pipeline(
    model: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
) -> StableDiffusionPipeline:
    """Load a base SD1.5 model as an inference pipeline (DPM-Solver++, no safety checker).

    The components are loaded afresh (not shared with training in the same process), so adding
    LoRAs to this pipeline never touches another pipeline's UNet.

    Args:
        model: A hub id or a local diffusers pipeline folder.
        device: Where to run.
        dtype: Weight dtype (``float16`` on a GPU, ``float32`` on CPU).
        prediction_type: ``epsilon`` or ``v_prediction`` (``None``: the model's scheduler's).
        zero_terminal_snr: Zero-terminal-SNR betas and trailing timesteps (as the LoRA trained).

    Returns:
        The pipeline.
    """
    components = load_components(str(model), torch_dtype=dtype, reuse=False)
    components.noise_scheduler = configure_scheduler(
        components.noise_scheduler, prediction_type, zero_terminal_snr
    )
    pipe = build_pipeline(components).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_loras(
    pipe: StableDiffusionPipeline,
    sources: Sequence[str | Path],
    weights: Sequence[float] | None = None,
) -> list[LoadedLora]:
    """Load LoRAs into the pipeline as adapters ``lora0``, ``lora1``, ... and activate them all.

    Args:
        pipe: The pipeline.
        sources: LoRA folders, files (diffusers or kohya format) or hub ids.
        weights: One ``set_adapters`` weight per LoRA (default 1.0 each).

    Returns:
        The loaded adapters.

    Raises:
        ValueError: If the number of weights does not match the number of LoRAs.
    """
    weights = list(weights) if weights else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ValueError(f"{len(sources)} LoRAs but {len(weights)} weights")
    loaded = []
    for i, (source, weight) in enumerate(zip(sources, weights, strict=True)):
        location, weight_name = _lora_location(source)
        adapter = f"lora{i}"
        _load_lora(pipe, location, weight_name, adapter)
        loaded.append(LoadedLora(adapter, str(source), float(weight)))
        log.info("loaded LoRA %s as %s (weight %s)", source, adapter, weight)
    return loaded


def _load_lora(
    pipe: StableDiffusionPipeline, location: str, weight_name: str | None, adapter: str
) -> None:
    """One LoRA as ``adapter``: diffusers' loader, or PEFT's LoHa/LoKr for LyCORIS files.

    diffusers' ``load_lora_weights`` takes LoRA and LoCon (diffusers or kohya keys) only; a file
    with LyCORIS LoHa/LoKr tensors has its UNet part added as a PEFT adapter
    (:func:`~lightning_lora.lora.lycoris.add_lycoris_adapter`) and its text encoder's LoRA, if
    any, loaded by diffusers under the same adapter name.
    """
    path = Path(location) / weight_name if weight_name else None
    keys: list[str] = []
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:  # the header only: no tensor read twice
            keys = list(f.keys())
    if not any(is_lycoris_key(k) for k in keys):
        pipe.load_lora_weights(location, weight_name=weight_name, adapter_name=adapter)
        return
    state = load_file(str(path))
    if any(k.startswith("unet.") for k in state):
        raise ValueError(
            f"{path} holds PEFT LoHa/LoKr tensors: load its folder or {KOHYA_WEIGHT_NAME}"
        )
    text = {k: v for k, v in state.items() if k.startswith("lora_te")}
    if text:
        pipe.load_lora_weights(text, adapter_name=adapter)
    add_lycoris_adapter(pipe.unet, {k: v for k, v in state.items() if k not in text}, adapter)


def set_lora_scale(
    pipe: StableDiffusionPipeline, loras: Sequence[LoadedLora], scale: float
) -> None:
    """Set every adapter's strength to ``weight * scale`` (0 turns the LoRAs off exactly)."""
    if loras:
        pipe.set_adapters([lo.adapter for lo in loras], [lo.weight * scale for lo in loras])
