"""Validation: the deterministic validation loss and sample grids generated with the LoRA."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from lightning_lora.models import SDComponents

log = logging.getLogger(__name__)


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Paste images of equal size into one grid image.

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
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def build_pipeline(
    components: SDComponents, unet: torch.nn.Module | None = None
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
        safety_checker=None,
        feature_extractor=None,
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

    Returns:
        The images.
    """
    device = pipe.unet.device
    images = []
    kwargs = {} if lora_scale is None else {"cross_attention_kwargs": {"scale": lora_scale}}
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        side = resolution // pipe.vae_scale_factor
        latents = torch.randn((1, pipe.unet.config.in_channels, side, side), generator=gen).to(
            device, pipe.unet.dtype
        )
        out = pipe(
            prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=latents,
            output_type="pil",
            **kwargs,
        )
        images.append(out.images[0])
    return images


def sample_images(
    pl_module: L.LightningModule,
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
        pl_module: The :class:`~lightning_lora.module.LoRAModule`.
        prompts: One image per prompt.
        resolution: Image side in pixels.
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale.
        seed: Seed of the noise (per prompt: ``seed + index``).

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
            return generate(pipe, prompts, resolution, steps, guidance_scale, seed)
    finally:
        pl_module.unet.train(was_training[0])
        pl_module.text_encoder.train(was_training[1])
        cast_training_params([pl_module.unet, pl_module.text_encoder], dtype=torch.float32)


class ValidationCallback(L.Callback):
    """Every N epochs and at the end: log ``val/loss`` and save a sample grid."""

    def __init__(
        self,
        samples_dir: str,
        every_n_epochs: int = 1,
        prompts: Sequence[str] = (),
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        resolution: int | None = None,
    ) -> None:
        """Configure validation.

        Args:
            samples_dir: Where ``epoch_XXXX.png`` grids go.
            every_n_epochs: Validation period in epochs (the last epoch is always validated).
            prompts: Prompts of the sample grid; none means no grid.
            num_inference_steps: Denoising steps per sample.
            guidance_scale: Classifier-free guidance scale.
            seed: Seed of the samples' noise (fixed, so grids are comparable across epochs).
            resolution: Sample size; defaults to the training resolution.
        """
        self.samples_dir = Path(samples_dir)
        self.every_n_epochs = max(1, every_n_epochs)
        self.prompts = list(prompts)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.resolution = resolution
        self.last_grid: Path | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return last or epoch % self.every_n_epochs == 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        val_loss = pl_module.validation_loss()
        pl_module.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        if self.prompts:
            self._sample(trainer, pl_module)

    @rank_zero_only
    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resolution = self.resolution or getattr(trainer.datamodule, "resolution", 512)
        images = sample_images(
            pl_module,
            self.prompts,
            resolution,
            self.num_inference_steps,
            self.guidance_scale,
            self.seed,
        )
        grid = make_grid(images)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        path = self.samples_dir / f"epoch_{trainer.current_epoch + 1:04d}.png"
        grid.save(path)
        self.last_grid = path
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    "samples", np.asarray(grid), trainer.global_step, dataformats="HWC"
                )
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples", [grid], step=trainer.global_step)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_image(logger.run_id, grid, f"samples/{path.name}")
        log.info("sample grid written to %s", path)
