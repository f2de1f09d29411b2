"""The demo's style report (``lightning_lora.demo.style_report``): the demo LoRA visibly learns
the demo style (measured by the colour-histogram style distance), the base-vs-LoRA grid and the
loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_lora.demo.shapes import COLOURS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.slow
def test_the_demo_lora_moves_samples_at_least_30_percent_closer_to_the_style(
    tmp_path: Path, ll_cache: Path
) -> None:
    from lightning_lora.config import compose_config
    from lightning_lora.training.run import train

    cfg = compose_config(
        ["experiment=demo", "trainer.enable_progress_bar=false"], output_dir=tmp_path
    )
    train(cfg)
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    base, lora = metrics["style_distance/base"], metrics["style_distance/lora"]
    assert lora <= 0.7 * base, (base, lora)
    grid = Image.open(tmp_path / "samples" / "base_vs_lora.png")
    prompts = len(cfg.validation.prompts)
    assert grid.height == 2 * 64 * 2 and grid.width > prompts * 64 * 2  # two rows, x2, labels
    assert (tmp_path / "samples" / "loss_curve.png").stat().st_size > 1000
    # the model card beside the LoRA shows the final sample grid, copied beside it
    card = (tmp_path / "lora" / "README.md").read_text(encoding="utf-8")
    assert 'instance_prompt: "lldemo"' in card and "](samples.png)" in card
    final = (tmp_path / "samples" / "epoch_0040.png").read_bytes()
    assert (tmp_path / "lora" / "samples.png").read_bytes() == final


def test_the_comparison_grid_puts_the_base_row_over_the_lora_row() -> None:
    from lightning_lora.demo.style_report import labelled_grid

    red = Image.new("RGB", (8, 8), COLOURS["red"])
    blue = Image.new("RGB", (8, 8), COLOURS["blue"])
    grid = labelled_grid({"base": [red, red], "lora": [blue, blue]}, ["p1", "p2"], scale=2)
    assert grid.size == (48 + 2 * 16, 2 * 16)
    assert grid.getpixel((48 + 3, 3)) == COLOURS["red"]
    assert grid.getpixel((48 + 3, 16 + 3)) == COLOURS["blue"]


def test_the_loss_curve_is_written_without_switching_matplotlib_backend(tmp_path: Path) -> None:
    """A notebook trains in-process: its inline plots must keep working after the report."""
    import matplotlib

    from lightning_lora.demo.style_report import plot_loss_curve

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_loss_curve([1.0 / (i + 1) for i in range(40)], tmp_path / "loss.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    with Image.open(tmp_path / "loss.png") as png:
        assert png.format == "PNG" and png.width > 300


def test_the_base_row_switches_off_the_unet_and_text_encoder_loras(make_cfg) -> None:
    from lightning_lora.demo.style_report import adapters_disabled
    from lightning_lora.training.inference import add_loras, load_pipeline
    from lightning_lora.training.run import train

    # a UNet + text encoder LoRA on the tiny model, loaded back from its exported file
    result = train(make_cfg("lora.text_encoder.enabled=true", "trainer.max_epochs=1"))
    pipe = load_pipeline(make_cfg().model.pretrained_model_name_or_path)
    add_loras(pipe, [result.lora.diffusers])
    ids = pipe.tokenizer(["a house"], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        with_lora = pipe.unet(latents, 500, context).sample
        with adapters_disabled(pipe.unet, pipe.text_encoder):
            base_context = pipe.text_encoder(ids)[0]
            base = pipe.unet(latents, 500, base_context).sample
        again = pipe.unet(latents, 500, pipe.text_encoder(ids)[0]).sample
    assert not torch.allclose(base_context, context)  # the text encoder's LoRA was off too
    assert not torch.allclose(base, with_lora)
    torch.testing.assert_close(again, with_lora)  # and both are back on afterwards
    clean = load_pipeline(make_cfg().model.pretrained_model_name_or_path)
    with torch.no_grad():
        reference = clean.unet(latents, 500, clean.text_encoder(ids)[0]).sample
    torch.testing.assert_close(base, reference)


@pytest.mark.slow  # trains twice
def test_the_loss_curve_of_a_resumed_run_starts_at_step_one(
    make_cfg, demo_images: Path, tmp_path: Path
) -> None:
    """The per-step losses travel in the checkpoint (the callback's ``state_dict``)."""
    from lightning_lora.demo.style_report import StyleReportCallback
    from lightning_lora.training.run import train

    def report(name: str) -> StyleReportCallback:
        return StyleReportCallback(
            samples_dir=str(tmp_path / name),
            style_dir=str(demo_images),
            prompts=["a cat"],
            num_inference_steps=2,
        )

    first_report = report("first")
    first = train(
        make_cfg("trainer.max_epochs=1", output_dir=tmp_path / "first"), callbacks=[first_report]
    )
    steps_first = len(first_report._losses)
    assert steps_first == first.metrics["steps"] > 0
    resumed_report = report("resumed")
    resumed = train(
        make_cfg("trainer.max_epochs=2", output_dir=tmp_path / "resumed"),
        callbacks=[resumed_report],
        ckpt_path=first.last_checkpoint,
    )
    assert len(resumed_report._losses) == resumed.metrics["steps"] == 2 * steps_first
    before = torch.stack(first_report._losses)
    assert torch.equal(torch.stack(resumed_report._losses[:steps_first]), before)
    checkpoint = torch.load(first.last_checkpoint, map_location="cpu", weights_only=True)
    assert any("StyleReportCallback" in key for key in checkpoint["callbacks"])
