"""The embedded demo's pretrained tiny model (``lightning_lora.demo.model``): small, SD1.5-shaped,
loaded with ``from_pretrained``, and it draws what its captions say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_lora.demo.model import DEMO_MODEL_DIR, demo_model_path
from lightning_lora.demo.shapes import COLOURS, WORDS, background_colour, draw_scene
from lightning_lora.training.models import load_components
from tests.support.images import demo_scenes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
    scenes = demo_scenes(16, seed=99)
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
