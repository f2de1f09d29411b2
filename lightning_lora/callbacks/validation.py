"""Validation during training: the deterministic ``val/loss`` and sample grids at a fixed seed."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_lora.training.inference import make_grid, sample_prompt_images
from lightning_lora.training.module import LoRAModule
from lightning_lora.training.sample_prompts import SamplePrompt, resolve_sample_prompts

__all__ = ["ValidationCallback"]

log = logging.getLogger(__name__)


class ValidationCallback(L.Callback):
    """Every N epochs and at the end: log ``val/loss`` and save a sample grid."""

    def __init__(
        self,
        samples_dir: str,
        every_n_epochs: int = 1,
        prompts: Sequence[str | Mapping[str, Any]] = (),
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        resolution: int | None = None,
        prompts_file: str | None = None,
    ) -> None:
        """Configure validation.

        Args:
            samples_dir: Where ``epoch_XXXX.png`` grids go.
            every_n_epochs: Validation period in epochs (the last epoch is always validated).
            prompts: Prompts of the sample grid; none means no grid. Strings, or mappings
                ``{prompt, negative_prompt, seed, width, height, steps, guidance_scale}`` whose
                missing keys take the settings below (see
                :mod:`lightning_lora.training.sample_prompts`). ``{token}`` in a prompt is
                replaced by the run's style token (:meth:`use_token`).
            num_inference_steps: Denoising steps per sample.
            guidance_scale: Classifier-free guidance scale.
            seed: Seed of the samples' noise (fixed, so grids are comparable across epochs);
                prompt ``i`` without a seed of its own uses ``seed + i``.
            resolution: Sample size; defaults to the training resolution.
            prompts_file: A prompt file in kohya's syntax, its prompts after ``prompts``.
        """
        self.samples_dir = Path(samples_dir)
        self.every_n_epochs = max(1, every_n_epochs)
        #: the grid's prompts, each with its own settings (read and checked now)
        self.samples: list[SamplePrompt] = resolve_sample_prompts(prompts, prompts_file)
        #: the prompt texts, left to right (the model card's and the completion's)
        self.prompts = [sample.prompt for sample in self.samples]
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.resolution = resolution
        self.last_grid: Path | None = None

    def use_token(self, token: str) -> None:
        """Put the run's style token in place of ``{token}`` in the prompts.

        The token is literal text (a job's ``style_token``): it is substituted, never formatted
        or interpolated, so braces or ``${...}`` in it stay as they are.
        """
        self.samples = [sample.with_token(token) for sample in self.samples]
        self.prompts = [sample.prompt for sample in self.samples]

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return last or epoch % self.every_n_epochs == 0

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        assert isinstance(pl_module, LoRAModule), "validation needs the LoRAModule"
        val_loss = pl_module.validation_loss()
        pl_module.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        if self.prompts:
            self._sample(trainer, pl_module)

    @rank_zero_only
    def _sample(self, trainer: L.Trainer, pl_module: LoRAModule) -> None:
        resolution = self.resolution or int(getattr(trainer.datamodule, "resolution", 512))  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        samples = [
            sample.filled(
                self.seed + i, resolution, resolution, self.num_inference_steps, self.guidance_scale
            )
            for i, sample in enumerate(self.samples)
        ]
        images = sample_prompt_images(pl_module, samples)
        grid = make_grid(images)  # prompts of other sizes: centred in the largest size's cells
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
