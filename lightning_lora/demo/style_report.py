"""The end-of-training style report: base model against LoRA, side by side and measured.

At the end of fit it generates the same prompts at the same seeds twice, with every LoRA adapter
off (the base model; a trained text encoder's LoRA too) and on, and writes:

- ``base_vs_lora.png``: a row of base samples over a row of LoRA samples;
- ``loss_curve.png``: the training loss of every step and its moving average;
- ``style_distance/base`` and ``style_distance/lora`` in the run summary: the distance of each
  sample set to the style images (:func:`lightning_lora.demo.shapes.style_distance`), so "the LoRA
  learned the style" is a number, not a claim.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image, ImageDraw
from typing_extensions import override

from lightning_lora.data.image_folder import find_style_images, load_rgb
from lightning_lora.demo.shapes import style_distance
from lightning_lora.training.inference import make_grid, sample_images
from lightning_lora.training.module import LoRAModule

log = logging.getLogger(__name__)


class StyleReportCallback(L.Callback):
    """Compare the base model and the LoRA on fixed prompts when training ends.

    Attributes:
        distances: ``style_distance/base`` and ``style_distance/lora`` once fit has ended.
        grid_path: The comparison grid once written.
        loss_curve_path: The loss curve once written.
    """

    def __init__(
        self,
        samples_dir: str,
        style_dir: str,
        prompts: Sequence[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        seed: int = 0,
        resolution: int | None = None,
    ) -> None:
        """Configure the report.

        Args:
            samples_dir: Where ``base_vs_lora.png`` and ``loss_curve.png`` go.
            style_dir: The style images the samples are measured against (the training folder).
            prompts: One column of the grid per prompt.
            num_inference_steps: Denoising steps per sample.
            guidance_scale: Classifier-free guidance scale.
            seed: Seed of the noise (per prompt: ``seed + index``; the same for both rows).
            resolution: Sample size; defaults to the training resolution.
        """
        if not prompts:
            raise ValueError("StyleReportCallback needs at least one prompt")
        self.samples_dir = Path(samples_dir)
        self.style_dir = Path(style_dir)
        self.prompts = list(prompts)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.resolution = resolution
        self.distances: dict[str, float] = {}
        self.grid_path: Path | None = None
        self.loss_curve_path: Path | None = None
        self._losses: list[torch.Tensor] = []

    def use_token(self, token: str) -> None:
        """Put the run's style token in place of ``{token}`` in the prompts (as validation does)."""
        self.prompts = [prompt.replace("{token}", token) for prompt in self.prompts]

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float())  # no device sync: read at the end

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, LoRAModule), "the style report needs the LoRAModule"
        resolution = self.resolution or int(getattr(trainer.datamodule, "resolution", 512))  # type: ignore[attr-defined]  # set by Lightning, undeclared on Trainer
        rows = {}
        models = (pl_module.unet, pl_module.text_encoder)
        for name, context in (
            ("base", adapters_disabled(*models)),
            ("lora", contextlib.nullcontext()),
        ):
            with context:
                rows[name] = sample_images(
                    pl_module,
                    self.prompts,
                    resolution,
                    self.num_inference_steps,
                    self.guidance_scale,
                    self.seed,
                )
        style = [load_rgb(item.path) for item in find_style_images(self.style_dir, "", "")]
        self.distances = {
            f"style_distance/{name}": style_distance(images, style) for name, images in rows.items()
        }
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.grid_path = self.samples_dir / "base_vs_lora.png"
        labelled_grid(rows, self.prompts).save(self.grid_path)
        if self._losses:
            losses = torch.stack(self._losses).cpu().tolist()
            self.loss_curve_path = self.samples_dir / "loss_curve.png"
            plot_loss_curve(losses, self.loss_curve_path)
        log.info(
            "style distance to the style images: base %.3f, LoRA %.3f (%s)",
            self.distances["style_distance/base"],
            self.distances["style_distance/lora"],
            self.grid_path,
        )

    def summary(self) -> dict[str, float]:
        """The run-summary figures: the two style distances (empty before fit ends)."""
        return dict(self.distances)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The per-step losses so far, so a resumed run's loss curve starts at step one."""
        losses = torch.stack(self._losses).cpu() if self._losses else torch.zeros(0)
        return {"losses": losses}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._losses = list(state_dict.get("losses", torch.zeros(0)).unbind())


@contextlib.contextmanager
def adapters_disabled(*models: torch.nn.Module) -> Iterator[None]:
    """Switch off every PEFT adapter layer of the models (the UNet's and a text encoder's LoRA).

    Args:
        models: Models holding PEFT tuner layers.

    Yields:
        Nothing; the adapters are back on afterwards.
    """
    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def labelled_grid(
    rows: dict[str, list[Image.Image]], prompts: Sequence[str], scale: int = 2
) -> Image.Image:
    """A grid with one labelled row per sample set, enlarged for viewing.

    Args:
        rows: Row label to images (one per prompt).
        prompts: The prompts (numbered above the columns; listed in the log and README).
        scale: Enlargement of each image (nearest neighbour: pixels stay sharp).

    Returns:
        The grid image.
    """
    grid = make_grid([img for images in rows.values() for img in images], cols=len(prompts))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    label_w, cell_h = 48, grid.height // len(rows)
    canvas = Image.new("RGB", (grid.width + label_w, grid.height), "white")
    canvas.paste(grid, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(rows):
        draw.text((4, i * cell_h + cell_h // 2 - 5), name, fill="black")
    return canvas


def plot_loss_curve(losses: Sequence[float], path: Path, window: int = 20) -> None:
    """Plot the per-step training loss and its moving average to a PNG.

    Args:
        losses: The loss of each training step.
        path: The PNG to write.
        window: Steps of the moving average.
    """
    # matplotlib's Figure, not pyplot: no global backend switch in a notebook that trains in-process
    from matplotlib.figure import Figure

    steps = range(1, len(losses) + 1)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, color="0.75", linewidth=0.8, label="step loss")
    if len(losses) >= window:
        kernel = torch.ones(window) / window
        smooth = torch.nn.functional.conv1d(
            torch.tensor(losses).view(1, 1, -1), kernel.view(1, 1, -1)
        ).flatten()
        ax.plot(range(window, len(losses) + 1), smooth, color="C0", label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
