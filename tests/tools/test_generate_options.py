"""``lightning-lora-generate`` samples as the LoRA trained (prediction type, zero-terminal-SNR
betas, clip skip from its metadata or the flags), and draws plain prompts as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from hydra.utils import instantiate
from PIL import Image

from lightning_lora.lora.export import export_lora
from lightning_lora.lora.text_encoder import build_lora_configs
from lightning_lora.tools import generate
from lightning_lora.training.inference import load_pipeline
from lightning_lora.training.metadata import training_options_metadata
from tests.conftest import TINY_OVERRIDES, composed

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = (
    "module.prediction_type=v_prediction",
    "module.zero_terminal_snr=true",
    "model.clip_skip=2",
)


@pytest.fixture(scope="module")
def v_lora(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (freshly initialised) LoRA whose metadata says v-prediction, zero SNR, clip skip 2."""
    cfg = composed(*TINY_OVERRIDES, *OPTIONS)
    module = instantiate(cfg.module, _partial_=True)(
        components=instantiate(cfg.model), lora=build_lora_configs(cfg.lora)[0], lora_seed=0
    )
    folder = tmp_path_factory.mktemp("v-lora") / "lora"
    export_lora(module.unet, folder, training_options_metadata(cfg, module))
    return folder


def test_the_options_come_from_the_lora_metadata_unless_given(v_lora: Path) -> None:
    assert generate.sampling_options([str(v_lora)]) == ("v_prediction", True, 2)
    kohya = v_lora / "lora_kohya.safetensors"
    assert generate.sampling_options([str(kohya)]) == ("v_prediction", True, 2)
    assert generate.sampling_options([str(v_lora)], "epsilon", False, 1) == ("epsilon", False, 1)
    assert generate.sampling_options([]) == (None, False, 1)


def test_load_pipeline_takes_the_options(tiny_model: str) -> None:
    pipe = load_pipeline(tiny_model, prediction_type="v_prediction", zero_terminal_snr=True)
    base = load_pipeline(tiny_model)
    config = pipe.scheduler.config
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"]
    assert config["timestep_spacing"] == "trailing"
    assert torch.equal(pipe.scheduler.betas, rescale_zero_terminal_snr(base.scheduler.betas))
    assert base.scheduler.config["prediction_type"] == "epsilon"


def _parameters(path: Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.info["parameters"])


def test_generate_with_the_lora_uses_its_options(v_lora: Path, tmp_path: Path) -> None:
    common = ["--tiny", "--steps", "2", "--resolution", "64", "--prompt", "a red circle"]
    assert generate.main([*common, "--lora", str(v_lora), "--out", str(tmp_path / "v.png")]) == 0
    settings = _parameters(tmp_path / "v.png")
    assert settings["prediction_type"] == "v_prediction"
    assert settings["zero_terminal_snr"] is True and settings["clip_skip"] == 2
    out = tmp_path / "flags.png"
    args = ["--lora", str(v_lora), "--no-zero-terminal-snr", "--clip-skip", "1"]
    assert generate.main([*common, *args, "--prediction-type", "epsilon", "--out", str(out)]) == 0
    settings = _parameters(out)
    assert (settings["prediction_type"], settings["zero_terminal_snr"]) == ("epsilon", False)
    assert settings["clip_skip"] == 1


def test_plain_generate_is_unchanged(tiny_model: str, tmp_path: Path) -> None:
    """Without a LoRA: the model's scheduler, the last layer, noise seeded seed + i."""
    prompts = ["a red circle", "a blue square"]
    out = tmp_path / "grid.png"
    argv = ["--tiny", "--steps", "2", "--resolution", "64", "--seed", "4", "--out", str(out)]
    assert generate.main([*argv, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    settings = _parameters(out)
    assert settings["prediction_type"] == "epsilon" and settings["clip_skip"] == 1
    with Image.open(out) as img:
        grid = np.asarray(img.convert("RGB"))
    pipe = load_pipeline(tiny_model)
    for i, prompt in enumerate(prompts):
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4 + i))
        with torch.no_grad():
            image = pipe(
                prompt,
                height=64,
                width=64,
                num_inference_steps=2,
                guidance_scale=7.5,
                latents=latents,
            ).images[0]
        assert np.array_equal(grid[:, i * 64 : (i + 1) * 64], np.asarray(image))
