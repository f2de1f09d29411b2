"""The demo model's pretraining (``lightning_lora.demo.pretrain``), in a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_lora.training.models import load_components

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
