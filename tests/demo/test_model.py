"""The embedded demo: a pretrained tiny model that draws what its captions say, and a LoRA that
visibly learns the demo style (measured by the colour-histogram style distance)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_lora.demo.model import DEMO_MODEL_DIR, demo_model_path
from lightning_lora.demo.shapes import (
    COLOURS,
    STYLE_PALETTE,
    WORDS,
    background_colour,
    draw_scene,
    draw_styled_scene,
    random_scene,
    style_distance,
)
from lightning_lora.training.models import load_components

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _scenes(count: int, seed: int = 3) -> list:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def test_the_shipped_demo_model_is_small_sd15_shaped_and_loads_with_from_pretrained() -> None:
    files = [f for f in DEMO_MODEL_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    parts = load_components(demo_model_path(), reuse=False)
    assert parts.unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert parts.unet.config.up_block_types == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert 2 ** (len(parts.vae.config.block_out_channels) - 1) == 8  # SD1.5's latent stride
    assert parts.vae.config.latent_channels == 4
    assert parts.noise_scheduler.config.beta_schedule == "scaled_linear"
    # every word of the scenes' captions is one token of its tokenizer
    for word in WORDS:
        assert len(parts.tokenizer.tokenize(word)) == 1, word


def test_the_demo_vae_is_trained_it_reconstructs_unseen_scenes() -> None:
    vae = load_components(demo_model_path()).vae
    scenes = _scenes(16, seed=99)
    x = (
        torch.stack(
            [torch.from_numpy(np.asarray(draw_scene(s))).permute(2, 0, 1) for s in scenes]
        ).float()
        / 127.5
        - 1
    )
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    assert (recon - x).abs().mean().item() < 0.08  # a random VAE gives about 0.5
    for scene, image in zip(scenes, recon, strict=True):
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        assert background_colour(Image.fromarray(pixels)) == scene.background


def test_the_demo_base_model_paints_the_background_colour_its_prompt_names() -> None:
    from lightning_lora.demo.pretrain import check_colour_prompts

    hits = check_colour_prompts(demo_model_path(), seeds=2)
    # chance is 1/8; every colour is asked for and most images must show it
    assert hits["all"] >= 0.75, hits
    assert sum(hits[c] > 0 for c in COLOURS) >= 7, hits


def test_style_distance_tells_the_style_from_plain_scenes() -> None:
    scenes = _scenes(16)
    plain = [draw_scene(s) for s in scenes]
    styled = [draw_styled_scene(s) for s in scenes]
    other_styled = [draw_styled_scene(s) for s in _scenes(16, seed=4)]
    assert style_distance(styled, styled) == 0.0
    assert style_distance(other_styled, styled) < 0.35  # same style, other scenes
    assert style_distance(plain, styled) > 0.8  # same scenes, not the style
    # the styled images use the palette's colours (antialiased edges aside)
    palette = np.asarray(STYLE_PALETTE)
    pixels = np.concatenate([np.asarray(img).reshape(-1, 3) for img in styled])
    nearest = np.abs(pixels[:, None, :].astype(int) - palette[None]).sum(-1).min(1)
    assert (nearest <= 12).mean() > 0.9


def test_pretraining_writes_a_model_that_loads_like_sd15(tmp_path: Path) -> None:
    from lightning_lora.demo.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(scenes=16, vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=2)
    folder = pretrain(tmp_path / "model", cfg, check_prompts=False)
    parts = load_components(str(folder), reuse=False)
    # the scaling factor comes from the trained VAE's latents, not SD1.5's constant
    assert parts.vae.config.scaling_factor != pytest.approx(0.18215)
    assert len(parts.tokenizer.tokenize("background")) == 1
    record = json.loads((folder / "pretraining.json").read_text())
    assert record["config"]["unet_steps"] == 2


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
